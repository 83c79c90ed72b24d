"""The server's TLS by flags: plaintext refused, mutual TLS by a client CA, sessions owned by certificate.

Certificates are made for each module run (`certificates.Authority`); clients are the project's
own `Client` with its `TLS` options, and raw grpc channels where the client library would not
even try (plaintext against TLS).
"""

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from certificates import Authority, Issued
from rnnserve.client import TLS, Client, SessionNotFound, Unavailable
from rnnserve.server.app import create_server
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA's certificate: trusted by clients, and the servers' client CA for mutual TLS
    server: Issued  # for 127.0.0.1
    alice: Issued  # clients of the CA
    bob: Issued
    stranger: Issued  # a client of another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    authority = Authority(folder, "rnnserve-test-ca")
    stranger = Authority(folder, "another-ca").issue("stranger")
    return Pki(authority.cert, authority.issue("server", server=True), authority.issue("alice"),
               authority.issue("bob"), stranger)


def tls(pki: Pki, client: Issued | None = None) -> TLS:
    """Client TLS options that trust the test CA, presenting `client`'s certificate if given."""
    return TLS.from_files(pki.ca, *((client.cert, client.key) if client else ()))


def test_tls_serves_the_client_and_refuses_plaintext(start_server, pki):
    running = start_server(tls_cert=pki.server.cert, tls_key=pki.server.key)
    with Client(running.address, tls=tls(pki)) as client, client.session("The quick") as session:
        assert client.health() == "SERVING"
        assert session.step(" brown").position == len("The quick brown")
    with Client(running.address, retries=0) as plaintext, pytest.raises(Unavailable):
        plaintext.models()
    with grpc.insecure_channel(running.address) as channel, pytest.raises(grpc.RpcError) as refused:
        rnnserve_pb2_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_certificate_from_the_client_ca(start_server, pki):
    running = start_server(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca)
    for refused in (None, pki.stranger):
        with Client(running.address, tls=tls(pki, refused), retries=0) as client, pytest.raises(Unavailable):
            client.models()
    with Client(running.address, tls=tls(pki, pki.alice)) as client:
        assert [model.name for model in client.models()] == [running.model.name]


def test_sessions_belong_to_the_client_certificate(start_server, pki):
    running = start_server(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca)
    with Client(running.address, tls=tls(pki, pki.alice)) as alice, \
            Client(running.address, tls=tls(pki, pki.bob)) as bob:
        session = alice.session("The")
        with pytest.raises(SessionNotFound):
            bob.resume(session.id)
        assert alice.resume(session.id).position == len("The")


async def _create(settings: Settings, bundle) -> None:
    await create_server(settings, bundle)[0].stop(None)


def test_a_key_that_does_not_match_its_certificate_stops_the_start(pki, bundle):
    settings = Settings(listen="127.0.0.1:0", tls_cert=pki.server.cert, tls_key=pki.alice.key)
    with pytest.raises(OSError):
        asyncio.run(_create(settings, bundle))
