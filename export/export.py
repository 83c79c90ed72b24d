"""`rnnserve-export`: turn a training checkpoint into a verified bundle the server can load.

Nothing is written until the graph has proven equal to the PyTorch model: onnxruntime against
torch on random batches, lengths and states, and T single steps against one prefill of T
tokens. The bundle is assembled in a temporary directory, re-read through the server's own
loader, and only then moved into place, so a bundle directory is either complete or absent.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from rnnserve import bundle as bundle_format
from rnnserve.evaluate import evaluate_bundle
from rnnserve.export.cost import measure_step_cost
from rnnserve.export.model import ModelConfig, RecurrentLM
from rnnserve.parity import ERROR, parity_error
from rnnserve.vocab import UNKNOWN_ID, Vocabulary

OPSET = 17
LOGITS_TOLERANCE = 1e-4
STATE_TOLERANCE = 1e-5


class ParityError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes."""


def state_specs(config: ModelConfig) -> tuple[bundle_format.StateSpec, ...]:
    return tuple(bundle_format.StateSpec(n, f"{n}_in", f"{n}_out", config.layers, config.hidden_size)
                 for n in config.state_names)


def write_graph(model: RecurrentLM, path: Path) -> None:
    """Export with dynamic batch and time axes: one graph serves single steps and prefills."""
    specs = state_specs(model.config)
    tokens = torch.zeros((2, 3), dtype=torch.int64)
    inputs = [bundle_format.TOKENS_INPUT, *(s.input for s in specs)]
    outputs = [bundle_format.LOGITS_OUTPUT, *(s.output for s in specs)]
    axes = {bundle_format.TOKENS_INPUT: {0: "batch", 1: "time"}, bundle_format.LOGITS_OUTPUT: {0: "batch", 1: "time"},
            **{name: {0: "batch"} for s in specs for name in (s.input, s.output)}}
    with warnings.catch_warnings():
        # The tracer warns about shape checks and batch sizes that parity then proves harmless.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (tokens, *model.initial_state(2)), str(path), input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def check_parity(model: RecurrentLM, graph_path: Path, trials: int = 12, seed: int = 0) -> dict:
    """Compare onnxruntime with torch and single steps with prefill; raise ParityError with the numbers.

    The reference is the PyTorch model run in float64, so that the figure is the graph's own
    error rather than the sum of two float32 roundings.
    """
    config = model.config
    reference_model = copy.deepcopy(model).double()
    specs = state_specs(config)
    session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    outputs = [bundle_format.LOGITS_OUTPUT, *(s.output for s in specs)]
    rng = np.random.default_rng(seed)

    def run(tokens: np.ndarray, state: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(outputs, {bundle_format.TOKENS_INPUT: tokens, **{s.input: v for s, v in zip(specs, state)}})

    worst_logits = worst_state = worst_steps = 0.0
    for _ in range(trials):
        batch, length = int(rng.integers(1, 9)), int(rng.integers(1, 41))
        tokens = rng.integers(0, config.vocab_size, (batch, length))
        state = [(0.5 * rng.standard_normal((batch, config.layers, config.hidden_size))).astype(np.float32)
                 for _ in specs]  # [batch, layers, hidden] each
        with torch.no_grad():
            reference = [t.numpy() for t in reference_model(torch.from_numpy(tokens),
                                                            *(torch.from_numpy(v).double() for v in state))]
        got = run(tokens, state)
        worst_logits = max(worst_logits, parity_error(got[:1], reference[:1]))
        worst_state = max(worst_state, parity_error(got[1:], reference[1:]))
        carried, stepped = state, []
        for t in range(length):
            logits, *carried = run(tokens[:, t:t + 1], carried)
            stepped.append(logits)
        worst_steps = max(worst_steps, parity_error([np.concatenate(stepped, axis=1), *carried], got))
    report = {"trials": trials, "error": ERROR,
              "logits_vs_torch": worst_logits, "state_vs_torch": worst_state,
              "steps_vs_prefill": worst_steps,
              "tolerances": {"logits": LOGITS_TOLERANCE, "state": STATE_TOLERANCE, "steps": LOGITS_TOLERANCE}}
    if worst_logits > LOGITS_TOLERANCE or worst_state > STATE_TOLERANCE or worst_steps > LOGITS_TOLERANCE:
        raise ParityError(f"exported graph differs from the model: {json.dumps(report)}")
    return report


def build_manifest(model: RecurrentLM, vocab: Vocabulary, graph_path: Path, *, name: str, version: str,
                   extra: dict) -> dict:
    config = model.config
    return {
        "format_version": bundle_format.FORMAT_VERSION,
        "name": name,
        "version": version,
        "cell": config.cell,
        "sizes": {"vocab_size": config.vocab_size, "embed_size": config.embed_size,
                  "hidden_size": config.hidden_size, "layers": config.layers},
        "vocabulary": {"unknown_id": UNKNOWN_ID, "tokens": vocab.tokens},
        "inputs": {bundle_format.TOKENS_INPUT: {"shape": ["batch", "time"], "dtype": "int64"}},
        "outputs": {bundle_format.LOGITS_OUTPUT: {"shape": ["batch", "time", config.vocab_size], "dtype": "float32"}},
        "state": [s.to_dict() for s in state_specs(config)],
        "graph": {"file": bundle_format.GRAPH, "sha256": bundle_format.sha256_of(graph_path), "opset": OPSET,
                  "exporter": f"torch {torch.__version__}", "parameters": sum(p.numel() for p in model.parameters())},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def export_bundle(model: RecurrentLM, vocab: Vocabulary, out_dir: str | Path, *, name: str = "rnnserve-model",
                  version: str = "1", extra: dict | None = None,
                  val_ids: np.ndarray | None = None) -> bundle_format.Bundle:
    """Export, prove parity, optionally measure validation with onnxruntime, and write the bundle.

    `extra` adds manifest keys (training, corpus, baseline...). With `val_ids`, the manifest's
    metrics.val_bpc and metrics.val_top1 are measured here on the exported graph itself.
    """
    model = model.eval()
    out_dir = Path(out_dir)
    extra = dict(extra or {})
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        staging = Path(tmp) / "bundle"
        staging.mkdir()
        graph_path = staging / bundle_format.GRAPH
        write_graph(model, graph_path)
        extra["parity"] = check_parity(model, graph_path)
        extra["serving_cost"] = measure_step_cost(graph_path, state_specs(model.config))
        manifest = build_manifest(model, vocab, graph_path, name=name, version=version, extra=extra)
        bundle_format.write_manifest(staging, manifest)
        if val_ids is not None:
            score = evaluate_bundle(bundle_format.load_bundle(staging), val_ids)
            manifest.setdefault("metrics", {}).update(score.to_dict())
            bundle_format.write_manifest(staging, manifest)
        return bundle_format.install(staging, out_dir)


def load_checkpoint(path: Path) -> tuple[RecurrentLM, Vocabulary, dict]:
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    model = RecurrentLM(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model, Vocabulary(ckpt["vocab"]), ckpt


def baseline_for(run_dir: Path, corpus_path: str | None) -> dict:
    """The best Kneser-Ney n-gram on the same split, cached beside the checkpoint."""
    cache = run_dir / "baseline.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from rnnserve.export.corpus import load_corpus
    from rnnserve.export.ngram import best_baseline

    corpus = load_corpus(corpus_path)
    best, table = best_baseline(corpus.train_text, corpus.val_text, Vocabulary.from_text(corpus.train_text))
    result = {"name": f"interpolated modified Kneser-Ney {best.order}-gram", "val_bpc": round(best.bits_per_char, 4),
              "orders": {str(r.order): round(r.bits_per_char, 4) for r in table}}
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="rnnserve-export",
        description="Export a training run (its checkpoint.pt) to a bundle directory: model.onnx + "
                    "manifest.json, after proving parity and measuring validation with onnxruntime.")
    parser.add_argument("--run", type=Path, default=Path("runs/default"), help="training run directory")
    parser.add_argument("--out", type=Path, default=bundle_format.default_bundle_path(), help="bundle directory to write")
    parser.add_argument("--name", default=None, help="model name (default: <corpus>-<cell>)")
    parser.add_argument("--version", default="1", help="model version recorded in the manifest")
    parser.add_argument("--no-baseline", action="store_true", help="skip the n-gram baseline (quick tests)")
    parser.add_argument("--compare", type=Path, action="append", default=[], metavar="RUN",
                        help="another run directory (e.g. runs/quick) whose measured validation is "
                             "recorded beside this model's under `alternatives`")
    args = parser.parse_args(argv)

    from rnnserve.export.corpus import load_corpus

    model, vocab, ckpt = load_checkpoint(args.run / "checkpoint.pt")
    corpus_path = ckpt["config"].get("corpus")
    corpus = load_corpus(corpus_path)
    history = ckpt["history"]
    extra = {
        "metrics": {"train_seconds": round(ckpt["train_seconds"], 1), "train_steps": ckpt["step"],
                    "train_bpc": history[-1]["train_bpc"] if history else None,
                    "torch_val_bpc": (ckpt.get("final_validation") or {}).get("val_bpc")},
        "training": {**ckpt["config"], "device": ckpt.get("device", "cpu"),
                     "command": training_command(ckpt["config"])},
        "corpus": ckpt["corpus"],
        "history": history,
    }
    if not args.no_baseline:
        extra["baseline"] = baseline_for(args.run, corpus_path)
    if args.compare:
        extra["alternatives"] = {run.name: run_summary(run) for run in args.compare}
    name = args.name or f"{ckpt['corpus'].get('name', 'corpus')}-{model.config.cell}"
    started = time.monotonic()
    bundle = export_bundle(model, vocab, args.out, name=name, version=args.version, extra=extra,
                           val_ids=vocab.encode(corpus.val_text))
    metrics = bundle.manifest["metrics"]
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s: val {metrics['val_bpc']:.4f} bpc, "
          f"top-1 {metrics['val_top1']:.3f}; parity {bundle.manifest['parity']['logits_vs_torch']:.2e}")


def run_summary(run_dir: Path) -> dict:
    """Another run's figures as its training measured them (full validation split, torch)."""
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False, map_location="cpu")
    final = ckpt.get("final_validation") or {}
    return {"val_bpc": final.get("val_bpc"), "val_top1": final.get("val_top1"),
            "train_seconds": round(ckpt["train_seconds"], 1), "device": ckpt.get("device", "cpu"),
            "model": ckpt["model_config"], "command": training_command(ckpt["config"])}


def training_command(config: dict) -> str:
    """The command line that reproduces a run: its preset by name, or the flags that differ from default."""
    from rnnserve.export.train import PRESETS

    for name, preset in PRESETS.items():
        if dataclasses.asdict(preset) == config:
            return f"rnnserve-train --preset {name}"
    default = dataclasses.asdict(PRESETS["default"])
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in config.items() if default.get(k) != v and v is not None]
    return " ".join(["rnnserve-train", *flags])


if __name__ == "__main__":
    main()
