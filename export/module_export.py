"""`export_module`: any PyTorch module that keeps "tokens and state in, logits and state out" as a bundle.

The contract a module keeps (docs/MODELS-CONTRACT.md): `forward(tokens, *states) -> (logits, *new_states)`,
tokens int64 `[batch, time]`, each state batch-major `[batch, *trailing]` (float32 or float16), logits
`[batch, time, vocab]`, new states in the same order, shapes and dtypes; `state_shapes()` names the states
(name -> trailing shape, in order) and an optional `state_dtypes()` their storage dtypes.

Nothing is written until the graph has proven equal to the module: onnxruntime against torch on random
batches, lengths and states, and T single steps against one prefill of T tokens. The bundle is assembled
in a temporary directory, re-read through the server's own loader, and only then moved
into place, so a bundle directory is either complete or absent.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from rnnserve import bundle as bundle_format
from rnnserve.evaluate import evaluate_bundle
from rnnserve.export.cost import measure_step_cost
from rnnserve.parity import ERROR, parity_error
from rnnserve.vocab import AnyVocabulary

OPSET = 17
# Parity bounds by state dtype: a float16 state is rounded at every call (so T steps drift from one prefill
# that keeps its intermediate values in float32), a float32 state only by the graph's own arithmetic. That
# arithmetic alone can pass 1e-5: torch's own float32 GRU of 256 (rnnserve-train --preset bpe-gru) ends 40
# steps 1.2e-5 from float64, so the state bound is 5e-5, still 2 to 3 orders below any real export error.
TOLERANCES = {"float32": {"logits": 1e-4, "state": 5e-5, "steps": 1e-4},
              "float16": {"logits": 2e-3, "state": 2e-3, "steps": 2e-2}}
TRIALS = 12


class ParityError(RuntimeError):
    """The exported graph does not compute what the PyTorch module computes."""


def state_specs(module: torch.nn.Module, states: Mapping[str, tuple[int, ...]] | None = None
                ) -> tuple[bundle_format.StateSpec, ...]:
    """The module's states as the bundle names them: `<name>_in` and `<name>_out`, shapes and dtypes.

    `states` None asks `module.state_shapes()`; dtypes come from `module.state_dtypes()` when it has one.
    """
    if states is None:
        if not hasattr(module, "state_shapes"):
            raise TypeError(f"{type(module).__name__} has no state_shapes(): give export_module its states")
        states = module.state_shapes()
    dtypes = module.state_dtypes() if hasattr(module, "state_dtypes") else {}
    unknown = set(dtypes) - set(states)
    if unknown:
        raise ValueError(f"state_dtypes() names states that state_shapes() does not: {sorted(unknown)}")
    return tuple(bundle_format.StateSpec(name, f"{name}_in", f"{name}_out", tuple(int(d) for d in shape),
                                         dtypes.get(name, "float32"))
                 for name, shape in states.items())


def _torch_dtype(spec: bundle_format.StateSpec) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16}[spec.dtype]


def write_graph(module: torch.nn.Module, specs: tuple[bundle_format.StateSpec, ...], path: Path) -> None:
    """Export with dynamic batch and time axes: one graph serves single steps and prefills."""
    tokens = torch.zeros((2, 3), dtype=torch.int64)
    states = tuple(torch.zeros((2, *s.shape), dtype=_torch_dtype(s)) for s in specs)
    inputs = [bundle_format.TOKENS_INPUT, *(s.input for s in specs)]
    outputs = [bundle_format.LOGITS_OUTPUT, *(s.output for s in specs)]
    axes = {bundle_format.TOKENS_INPUT: {0: "batch", 1: "time"}, bundle_format.LOGITS_OUTPUT: {0: "batch", 1: "time"},
            **{name: {0: "batch"} for s in specs for name in (s.input, s.output)}}
    with warnings.catch_warnings():
        # The tracer warns about shape checks and batch sizes that parity then proves harmless.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (tokens, *states), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    _declare_state_shapes(path, specs)


def _declare_state_shapes(path: Path, specs: tuple[bundle_format.StateSpec, ...]) -> None:
    """Write the states' declared shapes into the graph's signature, where tracing may have left a static size
    as a symbol (an einsum's output, say); parity then proves the graph returns exactly those shapes."""
    graph = onnx.load(str(path))
    declared = {name: s.shape for s in specs for name in (s.input, s.output)}
    for value in [*graph.graph.input, *graph.graph.output]:
        if value.name in declared:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims[1:], declared[value.name], strict=True):
                dim.Clear()
                dim.dim_value = size
    onnx.save(graph, str(path))


def tolerances_of(specs: tuple[bundle_format.StateSpec, ...]) -> dict[str, float]:
    """The loosest bound any of the states' dtypes needs."""
    return {key: max(TOLERANCES[s.dtype][key] for s in specs) for key in TOLERANCES["float32"]}


def check_parity(module: torch.nn.Module, specs: tuple[bundle_format.StateSpec, ...], vocab_size: int,
                 graph_path: Path, trials: int = TRIALS, seed: int = 0) -> dict:
    """Compare onnxruntime with torch and single steps with prefill; raise ParityError with the numbers.

    With float32 states the reference is the module run in float64, so that the figure is the graph's
    own error rather than the sum of two float32 roundings; with float16 states the module runs as it is.
    """
    wide = all(s.dtype == "float32" for s in specs)
    reference_module = copy.deepcopy(module).double() if wide else module
    session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    outputs = [bundle_format.LOGITS_OUTPUT, *(s.output for s in specs)]
    rng = np.random.default_rng(seed)

    def run(tokens: np.ndarray, state: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(outputs, {bundle_format.TOKENS_INPUT: tokens, **{s.input: v for s, v in zip(specs, state)}})

    worst_logits = worst_state = worst_steps = 0.0
    for _ in range(trials):
        batch, length = int(rng.integers(1, 9)), int(rng.integers(1, 41))
        tokens = rng.integers(0, vocab_size, (batch, length))
        state = [(0.5 * rng.standard_normal((batch, *s.shape))).astype(s.dtype) for s in specs]  # [batch, *shape]
        with torch.no_grad():
            fed = (torch.from_numpy(v).double() if wide else torch.from_numpy(v) for v in state)
            reference = [t.float().numpy() for t in reference_module(torch.from_numpy(tokens), *fed)]
        got = run(tokens, state)
        _check_shapes(got, batch, length, vocab_size, specs)
        worst_logits = max(worst_logits, parity_error(got[:1], reference[:1]))
        worst_state = max(worst_state, parity_error([g.astype(np.float32) for g in got[1:]], reference[1:]))
        carried, stepped = state, []
        for t in range(length):
            logits, *carried = run(tokens[:, t:t + 1], carried)
            stepped.append(logits)
        worst_steps = max(worst_steps, parity_error([np.concatenate(stepped, axis=1), *carried], got))
    tolerances = tolerances_of(specs)
    report = {"trials": trials, "error": ERROR, "logits_vs_torch": worst_logits, "state_vs_torch": worst_state,
              "steps_vs_prefill": worst_steps, "tolerances": tolerances}
    if (worst_logits > tolerances["logits"] or worst_state > tolerances["state"]
            or not worst_steps <= tolerances["steps"]):
        raise ParityError(f"exported graph differs from the module: {json.dumps(report)}")
    return report


def _check_shapes(got: list[np.ndarray], batch: int, length: int, vocab_size: int,
                  specs: tuple[bundle_format.StateSpec, ...]) -> None:
    """The module kept the contract's shapes and dtypes: a state that comes back otherwise cannot be carried."""
    if got[0].shape != (batch, length, vocab_size):
        raise ParityError(f"logits have shape {list(got[0].shape)}, the contract says [{batch}, {length}, {vocab_size}] "
                          "([batch, time, vocab])")
    for spec, value in zip(specs, got[1:], strict=True):
        if value.shape != (batch, *spec.shape) or value.dtype != np.dtype(spec.dtype):
            raise ParityError(f"state {spec.name!r} comes back {list(value.shape)} {value.dtype}, it went in "
                              f"{[batch, *spec.shape]} {spec.dtype}: new states keep their shapes and dtypes")


def export_module(module: torch.nn.Module, vocabulary: AnyVocabulary, out_dir: str | Path, *, name: str,
                  version: str = "1", states: Mapping[str, tuple[int, ...]] | None = None, cell: str | None = None,
                  sizes: Mapping[str, int] | None = None, extra: dict | None = None,
                  val_ids: np.ndarray | None = None, characters: np.ndarray | None = None) -> bundle_format.Bundle:
    """Export `module`, prove parity, optionally measure validation with onnxruntime, and write a format-2 bundle.

    `states` None asks `module.state_shapes()`. `cell` names the architecture (default: the module's class);
    `sizes` adds figures beside vocab_size (layers, hidden_size...); `extra` adds manifest keys (training,
    corpus...). With `val_ids`, metrics.val_bpc and metrics.val_top1 are measured on the exported graph itself;
    `characters` [vocab] (characters each id holds) makes a subword model's val_bpc per character.
    """
    module = module.eval()
    specs = state_specs(module, states)
    if not specs:
        raise ValueError("the module declares no state: a model with no state needs no session server")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        staging = Path(tmp) / "bundle"
        staging.mkdir()
        graph_path = staging / bundle_format.GRAPH
        write_graph(module, specs, graph_path)
        manifest = {
            "format_version": bundle_format.FORMAT_VERSION,
            "name": name,
            "version": version,
            "cell": cell or type(module).__name__.lower(),
            "sizes": {"vocab_size": len(vocabulary), **(sizes or {})},
            "vocabulary": bundle_format.write_vocabulary(staging, vocabulary),
            "tokens_input": bundle_format.TOKENS_INPUT,
            "logits_output": bundle_format.LOGITS_OUTPUT,
            "state": [s.to_dict() for s in specs],
            "graph": {"file": bundle_format.GRAPH, "sha256": bundle_format.sha256_of(graph_path), "opset": OPSET,
                      "exporter": f"torch {torch.__version__}",
                      "parameters": sum(p.numel() for p in module.parameters())},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}),
            "parity": check_parity(module, specs, len(vocabulary), graph_path),
            "serving_cost": measure_step_cost(graph_path, specs),
        }
        bundle_format.write_manifest(staging, manifest)
        if val_ids is not None:
            score = evaluate_bundle(bundle_format.load_bundle(staging), val_ids, characters=characters)
            manifest.setdefault("metrics", {}).update(score.to_dict())
            bundle_format.write_manifest(staging, manifest)
        return bundle_format.install(staging, out_dir)
