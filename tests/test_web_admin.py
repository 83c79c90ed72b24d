"""Several model versions over HTTP. The Admin routes load, unload and switch versions and share named states
as the gRPC calls do, and open to exactly the tokens that open Admin over gRPC, in every way a server can be
configured; the named states of a version other than the default are registered, listed and deleted by naming
it."""

from __future__ import annotations

import shutil

import grpc
import httpx
import pytest

from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import RunningServer, repository

ADMIN_TOKEN, USER_TOKEN = "admin-token-0123456789", "user-token-0123456789"
TOKENS = {"none": None, "user": USER_TOKEN, "admin": ADMIN_TOKEN}


def serve(repo, **settings) -> RunningServer:
    return RunningServer(None, Settings(**{"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0",
                                           "model_repository": repo, "model_poll_seconds": 0, **settings}))


def http(running: RunningServer, token: str | None = None) -> httpx.Client:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return httpx.Client(base_url=f"http://127.0.0.1:{running.server.http_port}", headers=headers, timeout=30)


def test_admin_routes_load_switch_and_unload_versions(tmp_path, versions):
    repo = repository(tmp_path, versions, "tiny/1")
    running = serve(repo)
    shutil.copytree(versions / "tiny" / "2", repo / "tiny" / "2")  # not polled: loaded by a call
    try:
        with http(running) as client:
            loaded = client.post("/v1/admin/models/tiny/2/load", json={"make_default": True})
            assert loaded.status_code == 200, loaded.text
            assert (loaded.json()["version"], loaded.json()["default_version"]) == ("2", True)
            assert client.get("/v1/models/tiny/2").json()["default_version"] is True
            assert client.get("/v1/models/tiny").json()["version"] == "2"  # the default version
            assert client.get("/v1/models/tiny/1").json()["default_version"] is False
            session = client.post("/v1/sessions", json={"model_version": "1"}).json()["session"]
            assert session["model_version"] == "1"

            refused = client.post("/v1/admin/models/tiny/2/unload")
            assert refused.status_code == 400 and refused.json()["error"]["status"] == "FAILED_PRECONDITION"
            assert refused.json()["error"]["details"][0]["reason"] == "MODEL_IS_DEFAULT"
            conflict = client.post("/v1/admin/models/tiny/1/default", json={"version": "2"})
            assert conflict.status_code == 400 and "version" in conflict.json()["error"]["message"]
            made = client.post("/v1/admin/models/tiny/1/default", json={"server_default": True})
            assert made.status_code == 200 and made.json()["is_default"] is True
            unloaded = client.post("/v1/admin/models/tiny/2/unload").json()
            assert unloaded["retiring"] is True and unloaded["sessions"] == "0"  # int64: a string in JSON
            assert [model["version"] for model in client.get("/v1/models").json()["models"]] == ["1"]
            assert client.get("/v1/models/tiny/2").status_code == 404
            missing = client.post("/v1/admin/models/tiny/9/load")
            assert missing.status_code == 404 and missing.json()["error"]["details"][0]["reason"] == "MODEL_NOT_FOUND"
            last = client.post("/v1/admin/models/tiny/1/unload")
            assert last.status_code == 400  # the server's default model's only version: refused
            assert client.get(f"/v1/sessions/{session['session_id']}").status_code == 200
    finally:
        running.stop()


def test_named_states_of_a_version_other_than_the_default(tmp_path, versions):
    running = serve(repository(tmp_path, versions, "tiny/1", "tiny/2"))  # 2 the default
    try:
        with http(running) as client:
            registered = client.post("/v1/states", json={"name": "intro", "prompt_text": "The", "model_version": "1"})
            assert registered.status_code == 200, registered.text

            def names(**query: str) -> list[str]:
                return [state["name"] for state in client.get("/v1/states", params=query).json()["states"]]

            assert "intro" in names(model="tiny", model_version="1") and "intro" not in names()
            assert client.delete("/v1/states/intro").status_code == 404  # the default version has none
            assert client.delete("/v1/states/intro", params={"model_version": "1"}).status_code == 200
            assert "intro" not in names(model_version="1")
            missing = client.get("/v1/states", params={"model_version": "9"})
            assert missing.status_code == 404 and missing.json()["error"]["details"][0]["reason"] == "MODEL_NOT_FOUND"
    finally:
        running.stop()


# Which service each configuration opens to each token: (tokens file?, admin tokens file?) -> {token: (Admin,
# Inference)}, True where the call is let through. The rule is auth.ServiceTokens'; both faces must follow it.
CONFIGURATIONS = {
    "no tokens": ((False, False), {"none": (True, True), "user": (True, True), "admin": (True, True)}),
    "callers' tokens only": ((True, False), {"none": (False, False), "user": (False, True), "admin": (False, False)}),
    "both": ((True, True), {"none": (False, False), "user": (False, True), "admin": (True, False)}),
    "admin tokens only": ((False, True), {"none": (False, True), "user": (False, True), "admin": (True, True)}),
}


def grpc_allows(channel: grpc.Channel, token: str | None, admin: bool) -> bool:
    """Whether `token` opens Admin's methods (each of them alike) or an Inference method."""
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    admin_stub, inference_stub = rnnserve_pb2_grpc.AdminStub(channel), rnnserve_pb2_grpc.InferenceStub(channel)
    calls = [
        lambda: admin_stub.SetDefaultModel(pb.SetDefaultModelRequest(name="tiny", version="1"), metadata=metadata,
                                           timeout=30),
        lambda: admin_stub.RegisterSharedState(pb.RegisterStateRequest(name="house-style", prompt_text="The"),
                                               metadata=metadata, timeout=30),
        lambda: admin_stub.DeleteSharedState(pb.DeleteStateRequest(name="house-style"), metadata=metadata, timeout=30),
    ] if admin else [lambda: inference_stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)]
    allowed = set()
    for call in calls:
        try:
            call()
            allowed.add(True)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
            allowed.add(False)
    assert len(allowed) == 1, allowed  # every Admin method takes the same tokens
    return allowed.pop()


def http_allows(running: RunningServer, token: str | None, admin: bool) -> bool:
    """Whether `token` opens Admin's routes (each of them alike) or an Inference route."""
    with http(running, token) as client:
        if admin:
            answers = [client.post("/v1/admin/models/tiny/1/default"),
                       client.post("/v1/admin/states", json={"name": "house-style", "prompt_text": "The"}),
                       client.delete("/v1/admin/states/house-style")]
        else:
            answers = [client.get("/v1/models")]
    for answer in answers:
        assert answer.status_code in (200, 401), answer.text
        if answer.status_code == 401:
            assert answer.json()["error"]["status"] == "UNAUTHENTICATED"
            assert answer.headers["www-authenticate"] == "Bearer"
    codes = {answer.status_code for answer in answers}
    assert len(codes) == 1, codes  # every Admin route takes the same tokens
    return codes == {200}


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_admin_routes_take_the_tokens_grpc_admin_takes(tmp_path, versions, configuration):
    (callers, admins), expected = CONFIGURATIONS[configuration]
    (tmp_path / "tokens").write_text(f"{USER_TOKEN} user\n")
    (tmp_path / "admin-tokens").write_text(f"{ADMIN_TOKEN} operator\n")
    files = {**({"auth_tokens_file": tmp_path / "tokens"} if callers else {}),
             **({"admin_tokens_file": tmp_path / "admin-tokens"} if admins else {})}
    running = serve(repository(tmp_path, versions, "tiny/1"), **files)
    try:
        with grpc.insecure_channel(running.address) as channel:
            for name, token in TOKENS.items():
                over_grpc = tuple(grpc_allows(channel, token, admin) for admin in (True, False))
                over_http = tuple(http_allows(running, token, admin) for admin in (True, False))
                assert over_grpc == over_http == expected[name], name
    finally:
        running.stop()
