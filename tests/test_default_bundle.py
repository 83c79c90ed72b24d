"""The shipped models: version 1 (float) loads without torch and its figures are measured; version 2 is its
int8 copy, close enough to serve, with states and a parity of its own; model.json pins version 1 as the default."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from rnnserve.bundle import DEFAULT_MODEL, default_bundle_path, default_repository_path, load_bundle
from rnnserve.evaluate import evaluate_bundle
from rnnserve.export.corpus import load_corpus
from rnnserve.export.quantize import INT8_PARITY_TOLERANCE, MAX_BPC_COST, measure_parity
from rnnserve.initial_states import load_initial_states, state_after
from rnnserve.repository import ModelRepository

INT8_OPS = {"DynamicQuantizeLSTM", "MatMulInteger", "DynamicQuantizeMatMul"}  # what dynamic quantization writes
# A shipped state against the same prompt read again, as export parity measures: max |a - b| / max(1, |b|).
# The same graph on the CPU that made the state reads it exactly (0.0 on the Intel Xeon with AVX512-VNNI and AMX
# that made version 2), but onnxruntime picks its int8 kernels by instruction set, and they round and saturate
# differently (AVX2's u8s8 pairs saturate at int16, VNNI's do not): 0.0027 on an AMD EPYC (issue 21). One
# activation quantization step is 1/255 of a tensor's range, about 0.004 of a state's; over the 64 characters
# of a shipped prompt the recurrence keeps such steps from adding up (0.0027 is below one step), so the bound
# is a few steps, not a figure from one CPU. Copying the float graph's state instead is off by 0.07 (h).
INT8_STATE_TOLERANCE = 0.02


def model_version(version: str):
    return load_bundle(ModelRepository.scan(default_repository_path()).model(DEFAULT_MODEL).version_path(version))


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(default_bundle_path())


@pytest.fixture(scope="module")
def int8():
    return model_version("2")


@pytest.fixture(scope="module")
def val_text():
    return load_corpus(None).val_text


def relative_error(got: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(got - reference).max() / max(1.0, np.abs(reference).max()))


def test_the_repository_pins_the_float_version_as_the_default(bundle):
    model = ModelRepository.scan(default_repository_path()).model(DEFAULT_MODEL)
    assert model.versions == ("1", "2") and model.pinned_version == "1"
    assert json.loads((model.path / "model.json").read_text()) == {"default_version": "1"}
    assert default_bundle_path() == model.path / "1"
    assert (bundle.name, bundle.version) == (DEFAULT_MODEL, "1")


def test_manifest_keeps_the_reviewed_figures(bundle):
    manifest = bundle.manifest
    for key in ("val_bpc", "val_top1", "train_seconds"):
        assert isinstance(manifest["metrics"][key], (int, float)), key
    assert manifest["baseline"]["name"] and manifest["baseline"]["val_bpc"] > 0
    assert manifest["metrics"]["val_bpc"] <= 2.00
    assert manifest["metrics"]["val_bpc"] < manifest["baseline"]["val_bpc"]


@pytest.mark.parametrize("version", ["1", "2"])
def test_validation_figure_is_remeasured_from_the_graph(version, val_text):
    shipped = model_version(version)
    score = evaluate_bundle(shipped, shipped.vocab.encode(val_text))
    assert abs(score.bits_per_char - shipped.manifest["metrics"]["val_bpc"]) <= 0.01
    assert abs(score.top1 - shipped.manifest["metrics"]["val_top1"]) <= 0.01


def test_loading_the_bundle_imports_no_torch():
    code = ("import sys, json; from rnnserve.bundle import load_bundle, default_bundle_path; "
            "b = load_bundle(default_bundle_path()); print(json.dumps('torch' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) is False


def test_version_2_is_the_int8_copy_of_version_1(bundle, int8):
    assert (int8.name, int8.version) == (DEFAULT_MODEL, "2")
    assert int8.vocab.tokens == bundle.vocab.tokens and int8.states == bundle.states
    assert int8.manifest["quantization"]["source_sha256"] == bundle.sha256
    assert {node.op_type for node in onnx.load(str(int8.graph_path)).graph.node} & INT8_OPS
    assert not {node.op_type for node in onnx.load(str(bundle.graph_path)).graph.node} & INT8_OPS


def test_version_2_records_an_accuracy_within_the_allowed_cost(bundle, int8):
    float_bpc, int8_bpc = bundle.manifest["metrics"]["val_bpc"], int8.manifest["metrics"]["val_bpc"]
    assert int8.manifest["quantization"]["float_val_bpc"] == float_bpc
    assert int8.manifest["quantization"]["val_bpc"] == int8_bpc
    assert 0 <= int8_bpc - float_bpc <= MAX_BPC_COST


def test_version_2_ships_the_states_its_own_graph_reads(bundle, int8):
    float_states, int8_states = load_initial_states(bundle), load_initial_states(int8)
    assert [(s.name, s.prompt) for s in int8_states] == [(s.name, s.prompt) for s in float_states]
    for shipped, float_state in zip(int8_states, float_states):
        rows, next_logits = state_after(int8, shipped.prompt)
        assert relative_error(shipped.next_logits, next_logits) <= INT8_STATE_TOLERANCE
        own = max(relative_error(shipped.states[name], row) for name, row in rows.items())
        assert own <= INT8_STATE_TOLERANCE
        # and the bound tells the float graph's state, copied over, from another CPU's rounding
        assert max(relative_error(float_state.states[name], row) for name, row in rows.items()) > INT8_STATE_TOLERANCE


def test_the_float_version_keeps_its_export_parity(bundle):
    parity = bundle.manifest["parity"]
    assert parity["tolerances"] == {"logits": 1e-4, "state": 1e-5, "steps": 1e-4}
    assert parity["logits_vs_torch"] <= 1e-4 and parity["steps_vs_prefill"] <= 1e-4


def test_version_2_records_its_own_parity_within_its_own_tolerance(bundle, int8, val_text):
    parity = int8.manifest["parity"]
    tolerance = parity["tolerances"]["steps"]  # what the server's self-test holds version 2 to
    assert tolerance == INT8_PARITY_TOLERANCE > bundle.manifest["parity"]["tolerances"]["steps"]
    assert "logits_vs_torch" not in parity  # not the float bundle's section copied
    for key in ("steps_vs_prefill", "batch_vs_alone"):
        assert 0 < parity[key] <= tolerance, key  # int8 moves with batching, within its bound
    assert parity["state_dropped"]["least"] > tolerance  # the bound tells a lost state from rounding
    # measured again here (int8 kernels round differently on other machines, so within the bound, not equal)
    measured = measure_parity(int8, int8.vocab.encode(val_text))
    assert max(measured["steps_vs_prefill"], measured["batch_vs_alone"]) <= tolerance
    assert measured["state_dropped"]["least"] > tolerance


def test_version_2s_manifest_states_its_own_facts(bundle, int8):
    assert int8.manifest["created"] > bundle.manifest["created"]  # ISO 8601 in UTC, both
    assert int8.manifest["graph"]["exporter"].startswith("onnxruntime ")
    assert "torch_val_bpc" not in int8.manifest["metrics"] and "torch_val_bpc" in bundle.manifest["metrics"]
