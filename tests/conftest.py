"""Shared fixtures: tiny random-weight bundles of every cell, and real servers on loopback ports.

A test module marked `pytest.mark.every_model` runs each of its tests against every served kind
(`serving.SERVED_KINDS`: the shipped LSTM's kind, a GRU over a byte-level BPE tokenizer, a state-space
layer with a 4-D state): its `bundle`, and every server started from it, is that kind's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from rnnserve.bundle import Bundle
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import CELLS, SERVED_KINDS, RunningServer, TinyBundles, Unbatched, build_tiny_bundle

# gRPC and metrics on ephemeral loopback ports: every test server keeps metrics, as deployed.
LOOPBACK = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "every_model: run the module's tests against every served kind of model")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests of a module marked every_model take `served_kind` from SERVED_KINDS instead of the fixture's lstm."""
    if metafunc.definition.get_closest_marker("every_model") and "served_kind" in metafunc.fixturenames:
        metafunc.parametrize("served_kind", SERVED_KINDS, scope="session")


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> TinyBundles:
    """Every tiny bundle by kind (a cell, "bpe", "ssm"), each built when first asked for."""
    return TinyBundles(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def served_kind() -> str:
    """The kind of model `bundle` is: the shipped model's, an LSTM, unless the module is marked every_model."""
    return "lstm"


@pytest.fixture(scope="session")
def bundle(bundles: TinyBundles, served_kind: str) -> Bundle:
    return bundles[served_kind]


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
