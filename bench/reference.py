"""The reference bundle: built once with the project's own exporter, then reused from the cache.

The bundle goes through `export_bundle` like any trained model (parity checks, manifest, the
server's loader), so the server under test loads exactly what it would load in production.
Weights are random from a fixed seed: timing does not depend on training.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from rnnserve.bundle import Bundle, BundleError, load_bundle
from rnnserve.export.export import export_bundle
from rnnserve.export.model import ModelConfig, RecurrentLM
from rnnserve.vocab import UNKNOWN_TOKEN, Vocabulary


def reference_vocabulary(size: int) -> Vocabulary:
    """The unknown token and then printable ASCII characters, `size` tokens in all."""
    return Vocabulary([UNKNOWN_TOKEN, *string.printable[:size - 1]])


def bundle_dir(cache: Path, model: ModelConfig, seed: int) -> Path:
    """One cache entry per model and seed, so presets with different models never overwrite each other."""
    return cache / (f"{model.cell}-l{model.layers}-h{model.hidden_size}-e{model.embed_size}"
                    f"-v{model.vocab_size}-seed{seed}")


def reference_bundle(cache: Path, model: ModelConfig, seed: int) -> Bundle:
    """Load the cached bundle, or export it when it is missing or no longer loads."""
    path = bundle_dir(cache, model, seed)
    try:
        return load_bundle(path)
    except BundleError:
        torch.manual_seed(seed)
        return export_bundle(RecurrentLM(model), reference_vocabulary(model.vocab_size), path,
                             name="bench-reference", version="1")
