"""`rnnserve-quantize`: an int8 bundle that loads and serves, with its report and its own parity; refused when
too costly or when it disagrees with itself."""

import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from rnnserve.bundle import GRAPH, default_bundle_path, load_bundle, sha256_of, write_manifest
from rnnserve.export.corpus import load_corpus
from rnnserve.export.quantize import INT8_PARITY_TOLERANCE, QuantizationRefused, quantize_bundle
from rnnserve.initial_states import add_initial_state, load_initial_states, state_after
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import TINY_TEXT, RunningServer, create

COMMAND = str(Path(sys.executable).with_name("rnnserve-quantize"))


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TINY_TEXT * 60, encoding="utf-8")  # over the corpus minimum; its last tenth is validation
    return path


def quantize(bundle, out: Path, corpus_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([COMMAND, str(bundle.path), "--out", str(out), "--corpus", str(corpus_path), *extra],
                          capture_output=True, text=True, timeout=300)


def test_an_int8_bundle_is_measured_loads_and_serves(bundle, tmp_path):
    out = tmp_path / "int8"
    started = datetime.now(timezone.utc).replace(microsecond=0)
    done = quantize(bundle, out, corpus(tmp_path))
    assert done.returncode == 0, done.stderr
    quantized = load_bundle(out)  # the server's own checks: sha256, inputs and outputs
    report = quantized.manifest["quantization"]
    assert quantized.sha256 != bundle.sha256 and report["source_sha256"] == bundle.sha256
    assert quantized.version == f"{bundle.version}-int8"
    assert report["bpc_cost"] == round(report["val_bpc"] - report["float_val_bpc"], 4) and report["bpc_cost"] <= 0.02
    assert quantized.manifest["metrics"]["val_bpc"] == report["val_bpc"]
    assert {"step_us_batch1", "step_us_batch256"} <= report["serving_cost"].keys()
    assert 0 < report["difference_from_float"]["logits_max_abs"] < 1.0  # int8 rounds, but stays close
    ops = {node.op_type for node in onnx.load(str(quantized.graph_path)).graph.node}
    assert ops & {"DynamicQuantizeLSTM", "MatMulInteger", "DynamicQuantizeMatMul"}
    # the copy's own facts, not the float bundle's
    assert datetime.fromisoformat(quantized.manifest["created"]) >= started
    assert quantized.manifest["graph"]["exporter"].startswith("onnxruntime ")
    assert "torch_val_bpc" not in quantized.manifest["metrics"]
    parity = quantized.manifest["parity"]
    assert parity["tolerances"] == {"steps": INT8_PARITY_TOLERANCE} and "logits_vs_torch" not in parity
    assert parity["trials"] > 0 and parity["steps_vs_prefill"] <= INT8_PARITY_TOLERANCE
    assert parity["batch_vs_alone"] <= INT8_PARITY_TOLERANCE

    server = RunningServer(quantized, Settings(listen="127.0.0.1:0"))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = rnnserve_pb2_grpc.InferenceStub(channel)
            session_id = create(stub, prompt_text="The quick")
            prediction = stub.Step(pb.StepRequest(session_id=session_id, text=" ", top_k=5)).prediction
    finally:
        server.stop()
    assert len(prediction.token_ids) == 5 and np.all(np.diff(prediction.probabilities) <= 0)


def test_the_version_is_chosen_and_shipped_states_are_the_int8_graphs_own(bundle, tmp_path):
    source = tmp_path / "float"
    shutil.copytree(bundle.path, source)
    prompts = {"fox": "The quick brown fox", "dog": "the lazy dog. "}
    float_states = {name: add_initial_state(source, name, prompt) for name, prompt in prompts.items()}
    done = quantize(load_bundle(source), tmp_path / "2", corpus(tmp_path), "--version", "2")
    assert done.returncode == 0, done.stderr
    quantized = load_bundle(tmp_path / "2")
    assert quantized.version == "2" and quantized.name == bundle.name
    shipped = load_initial_states(quantized)
    assert [(s.name, s.prompt) for s in shipped] == list(prompts.items())  # names, prompts and order kept
    for state in shipped:
        rows, next_logits = state_after(quantized, state.prompt)  # the prompt read by the int8 graph
        np.testing.assert_allclose(state.next_logits, next_logits, rtol=0, atol=1e-6)
        for name, row in rows.items():
            np.testing.assert_allclose(state.states[name], row, rtol=0, atol=1e-6)
            assert np.abs(state.states[name] - float_states[state.name].states[name]).max() > 1e-4  # not the copy


def test_a_costlier_int8_is_refused_and_nothing_is_written(bundle, tmp_path):
    out = tmp_path / "int8"
    done = quantize(bundle, out, corpus(tmp_path), "--max-bpc-cost", "-1")  # any cost is too much
    assert done.returncode != 0 and not out.exists()
    assert "refused" in done.stderr and "limit -1.0" in done.stderr
    report = json.loads(done.stderr[done.stderr.index("{"):].strip())
    assert report["float_val_bpc"] > 0 and report["val_bpc"] > 0


def drop_state(source: Path, target: Path) -> None:
    """A copy of the bundle whose graph multiplies its state inputs by zero where they enter: it passes every
    file check and runs, but reads each call from zeros, as a graph exported with its state unconnected does."""
    shutil.copytree(source, target)
    model = onnx.load(str(target / GRAPH))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    for spec in load_bundle(source).states:
        for node in model.graph.node:
            node.input[:] = [f"{spec.input}_dropped" if name == spec.input else name for name in node.input]
        model.graph.node.insert(0, onnx.helper.make_node("Mul", [spec.input, "zero"], [f"{spec.input}_dropped"]))
    onnx.save(model, str(target / GRAPH))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["graph"]["sha256"] = sha256_of(target / GRAPH)
    write_manifest(target, manifest)


def test_an_int8_copy_that_loses_its_state_is_refused_and_nothing_is_written(tmp_path):
    # The shipped float model, whose logits depend on what it read: a tiny random model's barely do.
    source = tmp_path / "float"
    drop_state(default_bundle_path(), source)
    val_ids = load_bundle(source).vocab.encode(load_corpus(None).val_text[:4096])
    out = tmp_path / "int8"
    with pytest.raises(QuantizationRefused, match="disagrees with itself") as refused:
        quantize_bundle(source, out, val_ids, max_bpc_cost=1.0)  # both graphs forget alike: bits per char agree
    parity = json.loads(str(refused.value)[str(refused.value).index("{"):])
    assert parity["steps_vs_prefill"] > INT8_PARITY_TOLERANCE  # one token per call forgets
    assert parity["batch_vs_alone"] <= INT8_PARITY_TOLERANCE  # one call reads a whole sequence from zeros either way
    assert not out.exists()
