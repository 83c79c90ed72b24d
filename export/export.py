"""`rnnserve-export`: turn a training checkpoint into a verified bundle the server can load.

The export itself, with its proof of parity, is `export_module`'s: this module adds what a training
run knows (its history, corpus, baseline and the command that made it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from rnnserve import bundle as bundle_format
from rnnserve.export.architectures import rebuild_model
from rnnserve.export.datasets import characters_of, validation_ids, vocabulary_of
from rnnserve.export.model import RecurrentLM
from rnnserve.export.module_export import export_module
from rnnserve.vocab import AnyVocabulary, Vocabulary

def export_bundle(model: torch.nn.Module, vocab: AnyVocabulary, out_dir: str | Path, *, name: str = "rnnserve-model",
                  version: str = "1", extra: dict | None = None, val_ids: np.ndarray | None = None,
                  characters: np.ndarray | None = None) -> bundle_format.Bundle:
    """`export_module` for the models rnnserve-train makes: their states are [layers, hidden] each.

    `extra` adds manifest keys (training, corpus, baseline...). With `val_ids`, the manifest's
    metrics.val_bpc and metrics.val_top1 are measured here on the exported graph itself.
    """
    config = model.config
    cell = config.cell if isinstance(model, RecurrentLM) else "ssm"
    sizes = {k: v for k, v in config.to_dict().items() if isinstance(v, int) and k != "vocab_size"}
    return export_module(model, vocab, out_dir, name=name, version=version, cell=cell, sizes=sizes,
                         extra=extra, val_ids=val_ids, characters=characters)


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, AnyVocabulary, dict]:
    """Any run's model and vocabulary; a run from before --arch and --tokenizer is an LSTM/GRU/RNN over characters."""
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    model = rebuild_model(ckpt.get("arch", ckpt["model_config"].get("cell")), ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model, vocabulary_of(ckpt.get("vocabulary") or {"kind": "characters", "tokens": ckpt["vocab"]}), ckpt


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

    model, vocab, ckpt = load_checkpoint(args.run / "checkpoint.pt")
    corpus_path = ckpt["config"].get("corpus")
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
    if not args.no_baseline and vocab.has_text:
        extra["baseline"] = baseline_for(args.run, corpus_path)
    if args.compare:
        extra["alternatives"] = {run.name: run_summary(run) for run in args.compare}
    arch = ckpt.get("arch", ckpt["model_config"].get("cell"))
    name = args.name or f"{ckpt['corpus'].get('name', 'corpus')}-{arch}"
    started = time.monotonic()
    bundle = export_bundle(model, vocab, args.out, name=name, version=args.version, extra=extra,
                           val_ids=validation_ids(ckpt["config"], vocab), characters=characters_of(vocab))
    metrics = bundle.manifest["metrics"]
    figure = (f"{metrics['val_bpc']:.4f} bpc" if "val_bpc" in metrics
              else f"{metrics['val_bits_per_token']:.4f} bits/token (perplexity {metrics['val_perplexity']:.2f})")
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s: val {figure}, "
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
    from rnnserve.export.train import PRESETS, TrainConfig

    # A run from before --arch named it `cell`, and had none of the later fields: it used their defaults.
    config = {**dataclasses.asdict(TrainConfig()), **{("arch" if k == "cell" else k): v for k, v in config.items()}}
    for name, preset in PRESETS.items():
        if dataclasses.asdict(preset) == config:
            return f"rnnserve-train --preset {name}"
    default = dataclasses.asdict(PRESETS["default"])
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in config.items() if default.get(k) != v and v is not None]
    return " ".join(["rnnserve-train", *flags])


if __name__ == "__main__":
    main()
