"""Bearer tokens: the tokens file, the constant-time check, and a live server that refuses strangers.

Every method of the Inference service is called with an empty request (valid for each of them),
so a method added later is checked without this test being edited; health and reflection stay open.
"""

import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rnnserve.client import Client, Unauthenticated
from rnnserve.server.faces import auth
from rnnserve.server.faces.auth import Tokens, TokensFileError, bearer_token
from rnnserve.server.faces.wire import SERVICE
from rnnserve.server.main import main
from serving import raw_call
from test_metrics import samples, scrape

ALICE, BOB, ROTATED = "alice-token-0123456789", "bob-token-0123456789", "alice-token-rotated-0123"


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# rnnserve tokens\n\n{ALICE} alice\n  {ROTATED}   alice\n{BOB}\n")
    return path


def test_tokens_stand_for_their_names_or_a_hash_never_themselves(tokens_file):
    tokens = Tokens.from_file(tokens_file)
    assert tokens.identify(ALICE) == tokens.identify(ROTATED) == "alice"
    bob = tokens.identify(BOB)
    assert bob.startswith("token-") and BOB not in bob
    assert tokens.identify("alice") is None and tokens.identify("") is None and tokens.identify(None) is None


def test_every_token_is_compared_whichever_matches(tokens_file, monkeypatch):
    compared = []

    def compare_digest(a, b):
        compared.append(len(a) == len(b) == 32)  # digests: the presented token's length does not show
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", compare_digest)
    tokens = Tokens.from_file(tokens_file)
    for presented in (ALICE, BOB, "x" * 1000):
        compared.clear()
        tokens.identify(presented)
        assert compared == [True] * 3


@pytest.mark.parametrize(("text", "message"), [
    ("", "no tokens"),
    ("# only a comment\n", "no tokens"),
    (f"{ALICE} alice extra\n", "line 1: expected 'TOKEN [NAME]'"),
    ("short-token\n", "line 1: a token needs at least 16"),
    (f"{ALICE} a\n{ALICE} b\n", "line 2: the same token appears twice"),
])
def test_a_bad_tokens_file_is_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(TokensFileError, match=re.escape(message)):
        Tokens.from_file(path)


def test_a_server_with_a_bad_tokens_file_exits_with_a_message(tmp_path, bundle, caplog):
    path = tmp_path / "tokens"
    path.write_text("short\n")
    with pytest.raises(SystemExit) as exited:
        main(["--bundle", str(bundle.path), "--listen", "127.0.0.1:0", "--auth-tokens-file", str(path)])
    assert exited.value.code == 2
    assert "cannot serve" in caplog.text and str(path) in caplog.text


@pytest.mark.parametrize(("metadata", "token"), [
    ((("authorization", f"Bearer {ALICE}"),), ALICE),
    ((("x-other", "1"), ("authorization", f"bearer  {ALICE} ")), ALICE),
    ((("authorization", f"Basic {ALICE}"),), None),
    ((), None),
])
def test_the_bearer_token_is_read_from_the_authorization_metadata(metadata, token):
    assert bearer_token(metadata) == token


def call_every_method(channel: grpc.Channel, metadata) -> dict[str, grpc.StatusCode]:
    """Each Inference method called with an empty request, and the status code it ended with."""
    codes = {}
    for method in SERVICE.methods:
        try:
            raw_call(channel, method, b"", metadata=metadata, timeout=10)
            codes[method.name] = grpc.StatusCode.OK
        except grpc.RpcError as error:
            codes[method.name] = error.code()
            assert ALICE not in error.details() and "wrong" not in error.details()
    return codes


def test_refused_calls_are_counted_with_the_others(start_server, tokens_file):
    running = start_server(auth_tokens_file=tokens_file)
    with grpc.insecure_channel(running.address) as channel:
        call_every_method(channel, ())
        call_every_method(channel, (("authorization", "Bearer wrong-token-0123456789"),))
        call_every_method(channel, (("authorization", f"Bearer {ALICE}"),))
    found = samples(scrape(f"http://127.0.0.1:{running.server.metrics_port}/metrics"))
    refused = {dict(labels)["method"]: value for (name, labels), value in found.items()
               if name == "rnnserve_rpcs_total" and ("code", "UNAUTHENTICATED") in labels}
    assert refused == {method.name: 2 for method in SERVICE.methods}


def test_calls_without_a_known_token_are_unauthenticated_except_health_and_reflection(start_server, tokens_file):
    running = start_server(auth_tokens_file=tokens_file)
    with grpc.insecure_channel(running.address) as channel:
        for metadata in ((), (("authorization", "Bearer wrong-token-0123456789"),),
                         (("authorization", f"Basic {ALICE}"),)):
            codes = call_every_method(channel, metadata)
            assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
        codes = call_every_method(channel, (("authorization", f"Bearer {ALICE}"),))
        assert grpc.StatusCode.UNAUTHENTICATED not in codes.values(), codes
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {service.name for service in next(reflection).list_services_response.service}
        assert SERVICE.full_name in services


def test_the_client_library_sends_its_token(start_server, tokens_file):
    running = start_server(auth_tokens_file=tokens_file)
    with Client(running.address, token=ALICE) as client, client.session("The") as session:
        assert session.step(" quick").position == len("The quick")
    with Client(running.address, retries=0) as anonymous, pytest.raises(Unauthenticated):
        anonymous.models()
