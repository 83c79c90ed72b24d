"""Shared fixtures: tiny random-weight bundles of every cell, and real servers on loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from rnnserve.bundle import Bundle
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import CELLS, RunningServer, Unbatched, build_tiny_bundle

# gRPC and metrics on ephemeral loopback ports: every test server keeps metrics, as deployed.
LOOPBACK = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    root = tmp_path_factory.mktemp("bundles")
    return {cell: build_tiny_bundle(cell, root / cell) for cell in CELLS}


@pytest.fixture(scope="session")
def bundle(bundles: dict[str, Bundle]) -> Bundle:
    return bundles["lstm"]


@pytest.fixture(params=CELLS)
def any_bundle(request: pytest.FixtureRequest, bundles: dict[str, Bundle]) -> Bundle:
    """Each cell's bundle in turn."""
    return bundles[request.param]


@pytest.fixture(scope="session")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bundles to copy into model repositories (`serving.repository`): model "tiny" versions 1 and 2 (other
    weights), model "other" version 1."""
    root = tmp_path_factory.mktemp("versions")
    build_tiny_bundle("lstm", root / "tiny" / "1", name="tiny", version="1", seed=1)
    build_tiny_bundle("lstm", root / "tiny" / "2", name="tiny", version="2", seed=2)
    build_tiny_bundle("gru", root / "other" / "1", name="other", version="1", seed=3)
    return root


@pytest.fixture
def start_server(bundle: Bundle) -> Iterator[Callable[..., RunningServer]]:
    """Start servers with settings overrides (and optionally another bundle); all stop at teardown."""
    started: list[RunningServer] = []

    def start(serve: Bundle | None = None, **overrides) -> RunningServer:
        running = RunningServer(serve or bundle, Settings(**{**LOOPBACK, **overrides}))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="session")
def shared_server(bundle: Bundle) -> Iterator[RunningServer]:
    """One server with default settings for the tests that need nothing special."""
    running = RunningServer(bundle, Settings(**LOOPBACK))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def faces_server(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with both faces, gRPC and HTTP, taking the tokens of `faces.ALICE` and `faces.BOB`."""
    from faces import serve_both_faces  # imported here: faces imports this module's LOOPBACK

    running = serve_both_faces(bundle, tmp_path_factory.mktemp("tokens"))
    yield running
    running.stop()


@pytest.fixture
def alice(faces_server: RunningServer) -> Iterator:
    """The Python client of `faces_server`, as ALICE."""
    from faces import ALICE
    from rnnserve.client import Client

    with Client(faces_server.address, token=ALICE) as opened:
        yield opened


@pytest.fixture(scope="session")
def channel(shared_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(shared_server.address) as opened:
        yield opened


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> rnnserve_pb2_grpc.InferenceStub:
    return rnnserve_pb2_grpc.InferenceStub(channel)


@pytest.fixture(scope="session")
def unbatched() -> type[Unbatched]:
    return Unbatched
