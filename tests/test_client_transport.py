"""TLS, mutual TLS and the bearer token, end to end, against a TLS server that records what it receives.

The client's side is checked here against grpc's stock health service, which shows the metadata
the client sent; the rnnserve server's own TLS and tokens are tested in test_tls.py and test_auth.py.
"""

import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from certificates import Authority
from rnnserve.client import TLS, Client, Unavailable

COMMAND = str(Path(sys.executable).with_name("rnnserve-client"))


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A CA (ca.pem), a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    folder = tmp_path_factory.mktemp("pki")
    authority = Authority(folder, "ca")
    authority.issue("server", server=True)
    authority.issue("client")
    return folder


class _RecordMetadata(grpc.ServerInterceptor):
    def __init__(self):
        self.seen: list[dict[str, str]] = []

    def intercept_service(self, continuation, handler_call_details):
        self.seen.append(dict(handler_call_details.invocation_metadata))
        return continuation(handler_call_details)


@pytest.fixture(scope="module")
def tls_server(certificates):
    """A mutual-TLS server with the health service; yields its address and the metadata it received."""
    recorder = _RecordMetadata()
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[recorder])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    key, certificate, ca = ((certificates / name).read_bytes() for name in ("server.key", "server.pem", "ca.pem"))
    credentials = grpc.ssl_server_credentials([(key, certificate)], root_certificates=ca, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield f"127.0.0.1:{port}", recorder.seen
    server.stop(0)


def test_mutual_tls_and_bearer_token(certificates, tls_server):
    address, seen = tls_server
    tls = TLS.from_files(certificates / "ca.pem", certificates / "client.pem", certificates / "client.key")
    with Client(address, tls=tls, token="s3cret") as client:
        assert client.health() == "SERVING"
    assert seen[-1]["authorization"] == "Bearer s3cret"


def test_a_server_requiring_a_client_certificate_refuses_without_one(certificates, tls_server):
    address, _ = tls_server
    with Client(address, tls=TLS.from_files(certificates / "ca.pem"), retries=0) as client:
        with pytest.raises(Unavailable):
            client.health()


def test_cli_tls_flags_and_token_variable(certificates, tls_server):
    address, seen = tls_server
    flags = ["--tls-ca", "ca.pem", "--tls-cert", "client.pem", "--tls-key", "client.key"]
    done = subprocess.run([COMMAND, "--address", address, *flags, "health"], cwd=certificates, capture_output=True,
                          text=True, env={**os.environ, "RNNSERVE_TOKEN": "from-env"}, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr
    assert seen[-1]["authorization"] == "Bearer from-env"
