"""Test helpers: tiny bundles, a real server on a loopback port, and an unbatched reference.

A server runs in its own event loop on a background thread, exactly as `rnnserve-server`
runs it, so tests talk to it through real gRPC channels from the main thread.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onnx import helper

from rnnserve.bundle import Bundle, load_bundle, sha256_of
from rnnserve.server.app import Server, create_server
from rnnserve.server.core.served_model import ServedModel
from rnnserve.server.event_loop import loop_factory
from rnnserve.server.model.state_pool import StatePool
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb

CELLS = ("lstm", "gru", "rnn")
SERVED_KINDS = ("lstm", "bpe", "ssm")  # the shipped model's kind, a subword model, a model with a 4-D state
TINY_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789,;:!?'\n"


def free_port() -> int:
    """A loopback port nobody listens on at this moment: for peers that cannot bind port 0 and say which."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def end_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Ask a peer process to stop (SIGTERM); kill it if it has not within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def table_model(pool: StatePool, bundle: Bundle | None = None, batcher=None) -> ServedModel:
    """A model version as the session table and the batcher see one: its pool (and bundle and batcher when given);
    no cache, named states or metrics."""
    return ServedModel(bundle, pool, batcher, cache=None, states=None, events=None)


def build_tiny_bundle(cell: str, out_dir: Path, hidden_size: int = 16, name: str = "", version: str = "test",
                      seed: int = 1234) -> Bundle:
    """A 2-layer, 16-unit model with random weights from a fixed seed: fast to export and to run.

    A larger `hidden_size` makes the state, not Python, dominate a session's memory; `name` (default
    tiny-<cell>), `version` and `seed` make versions of one model for a model repository.
    """
    import torch

    from rnnserve.export.export import export_bundle
    from rnnserve.export.model import ModelConfig, RecurrentLM
    from rnnserve.vocab import Vocabulary

    torch.manual_seed(seed)
    vocab = Vocabulary.from_text(TINY_TEXT)
    model = RecurrentLM(ModelConfig(cell, len(vocab), embed_size=8, hidden_size=hidden_size, layers=2))
    return export_bundle(model, vocab, out_dir, name=name or f"tiny-{cell}", version=version)


def build_subword_bundle(out_dir: Path, seed: int = 1234) -> Bundle:
    """A one-layer GRU over a byte-level BPE tokenizer trained on a few KB of text, random weights."""
    import torch

    from rnnserve.export import export_module
    from rnnserve.vocab import TokenizerVocabulary
    from tiny_models import TinyGRU, tiny_corpus, train_tokenizer

    torch.manual_seed(seed)
    vocab = TokenizerVocabulary(train_tokenizer(tiny_corpus()))
    return export_module(TinyGRU(len(vocab)), vocab, out_dir, name="tiny-bpe", version="test", cell="gru")


def build_ssm_bundle(out_dir: Path, seed: int = 1234) -> Bundle:
    """A selective state-space layer with state [layers, heads, head_dim, d_state] over characters, random weights."""
    import torch

    from rnnserve.export import export_module
    from rnnserve.vocab import Vocabulary
    from tiny_models import TinySSM

    torch.manual_seed(seed)
    vocab = Vocabulary.from_text(TINY_TEXT)
    return export_module(TinySSM(len(vocab)), vocab, out_dir, name="tiny-ssm", version="test", cell="ssm")


class TinyBundles:
    """Tiny bundles by kind (a cell of CELLS, or "bpe", "ssm"), each built on first use and then kept."""

    def __init__(self, root: Path):
        self._root = root
        self._built: dict[str, Bundle] = {}

    def __getitem__(self, kind: str) -> Bundle:
        if kind not in self._built:
            out = self._root / kind
            self._built[kind] = (build_subword_bundle(out) if kind == "bpe" else build_ssm_bundle(out)
                                 if kind == "ssm" else build_tiny_bundle(kind, out))
        return self._built[kind]


def stateless_copy(bundle: Bundle, out: Path, version: str | None = None) -> Bundle:
    """`bundle` with every state input multiplied by zero before use: an export bug that loses the state between
    calls, in a graph that still has every input and output the manifest names."""
    shutil.copytree(bundle.path, out)
    graph = onnx.load(out / "model.onnx")
    for state in bundle.states:
        zeroed = f"{state.input}_zeroed"
        for node in graph.graph.node:
            node.input[:] = [zeroed if name == state.input else name for name in node.input]
        graph.graph.node.insert(0, helper.make_node("Mul", [state.input, "zero"], [zeroed]))
    graph.graph.initializer.append(helper.make_tensor("zero", onnx.TensorProto.FLOAT, [], [0.0]))
    onnx.save(graph, out / "model.onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graph"]["sha256"] = sha256_of(out / "model.onnx")
    manifest["version"] = version or manifest["version"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return load_bundle(out)  # every file check passes


def repository(tmp_path: Path, versions: Path, *names: str) -> Path:
    """A model repository in `tmp_path` holding `names` ("tiny/1", ...) copied from `versions` (conftest's)."""
    repo = tmp_path / "models"
    for name in names:
        shutil.copytree(versions / name, repo / name)
    return repo


async def _task_count() -> int:
    return len(asyncio.all_tasks())


class RunningServer:
    """A started server, its address, and a way to run coroutines on its event loop."""

    def __init__(self, bundle: Bundle, settings: Settings):
        self.loop = loop_factory(settings.event_loop)()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rnnserve-test-server", daemon=True)
        self._thread.start()
        self.server, self.port = self.run(self._start(settings, bundle))
        self.address = f"127.0.0.1:{self.port}"

    @staticmethod
    async def _start(settings: Settings, bundle: Bundle) -> tuple[Server, int]:
        server, port = create_server(settings, bundle)
        await server.start()
        return server, port

    def run(self, coroutine, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def engine(self):
        return self.server.engine

    @property
    def model(self):
        """The default version of the default model: the one version a server of one bundle serves."""
        return self.server.engine.models.get()

    def task_count(self) -> int:
        """How many asyncio tasks the server's loop holds now: what a task leak would grow."""
        return self.run(_task_count())

    def stop(self, grace: float = 0.0) -> None:
        # a stop may take twice its grace (the hand-off to the session store, then the calls in flight)
        self.run(self.server.stop(grace), timeout=30.0 + 2 * grace)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Unbatched:
    """In-process onnxruntime at batch 1 with the state carried by hand: the reference for served predictions."""

    def __init__(self, bundle: Bundle):
        import onnxruntime as ort

        self.bundle = bundle
        self._session = ort.InferenceSession(str(bundle.graph_path), providers=["CPUExecutionProvider"])
        self._outputs = [bundle.logits_output, *(s.output for s in bundle.states)]
        self.states = [s.zeros(1) for s in bundle.states]  # [1, *row_shape] each
        self.logits = np.zeros(len(bundle.vocab), np.float32)  # [vocab] after the last token read

    def feed(self, tokens) -> None:
        feed = {self.bundle.tokens_input: np.asarray(tokens, np.int64)[None, :],
                **{s.input: v for s, v in zip(self.bundle.states, self.states)}}
        logits, *self.states = self._session.run(self._outputs, feed)
        self.logits = logits[0, -1]

    def top_k(self, k: int, temperature: float = 1.0) -> tuple[list[int], np.ndarray]:
        """Ids of the k most likely next tokens, most likely first, and their probabilities (float64)."""
        scaled = self.logits.astype(np.float64) / temperature
        probabilities = np.exp(scaled - scaled.max())
        probabilities /= probabilities.sum()
        ids = np.argsort(-probabilities, kind="stable")[:k]
        return ids.tolist(), probabilities[ids]


def error_details(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo | None, list[str]]:
    """The ErrorInfo of a failed call (None without one) and the fields its BadRequest names."""
    status = rpc_status.from_call(error)  # None when the status has no details
    return (None, []) if status is None else status_details(status)


def status_details(status) -> tuple[error_details_pb2.ErrorInfo | None, list[str]]:
    """As `error_details`, for a google.rpc.Status (an in-band StepResponse.error)."""
    info, fields = None, []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [violation.field for violation in bad_request.field_violations]
    return info, fields


# Calls through the generated stubs -----------------------------------------------------------------

def create(stub, **fields) -> str:
    return stub.CreateSession(pb.CreateSessionRequest(**fields)).session.session_id


def position(stub, session_id: str) -> int:
    return stub.GetSession(pb.GetSessionRequest(session_id=session_id)).position


def raw_method(channel: grpc.Channel, method: MethodDescriptor):
    """The channel's callable for `method` taking its requests, and giving its responses, as bytes."""
    kind = ("stream" if method.client_streaming else "unary") + ("_stream" if method.server_streaming else "_unary")
    return getattr(channel, kind)(f"/{method.containing_service.full_name}/{method.name}")


def raw_call(channel: grpc.Channel, method: MethodDescriptor, request: bytes, **options):
    """Call `method` with its request given as bytes (a stream's one message too); its response(s) as bytes."""
    response = raw_method(channel, method)(iter([request]) if method.client_streaming else request, **options)
    return list(response) if method.server_streaming else response


def assert_prediction(prediction, reference: Unbatched, k: int = 5, temperature: float = 1.0) -> None:
    """The served top-k ids equal the reference's, and their probabilities agree within 1e-5."""
    ids, probabilities = reference.top_k(k, temperature)
    assert list(prediction.token_ids) == ids
    np.testing.assert_allclose(prediction.probabilities, probabilities, atol=1e-5)


def assert_fails(call, code, reason=None, field=None):
    """`call` fails with `code`, the ErrorInfo `reason` and a BadRequest naming `field`."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    info, fields = error_details(caught.value)
    if reason is not None:
        assert info is not None and info.reason == reason and info.domain == "rnnserve"
    if field is not None:
        assert field in fields and field in caught.value.details()
    return caught.value, info


def slow_model(running, seconds: float) -> None:
    """Make every model call of a running server take `seconds` longer."""
    runtime = running.model.batcher.runtime
    run = runtime.run

    def slow_run(*args):
        time.sleep(seconds)
        return run(*args)

    runtime.run = slow_run
