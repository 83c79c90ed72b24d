"""The architectures `rnnserve-train` builds, by name, and how a checkpoint rebuilds one.

Every one follows the export contract: forward(tokens, *states) -> (logits, *new_states), states
batch-major, declared in order by `state_shapes()`.
"""

from __future__ import annotations

from torch import nn

from rnnserve.export.model import CELLS, ModelConfig, RecurrentLM
from rnnserve.export.ssm import SelectiveSSMLM, SSMConfig

ARCHITECTURES = (*CELLS, "ssm")


def build_model(arch: str, vocab_size: int, *, embed_size: int, hidden_size: int, layers: int, dropout: float,
                state_size: int, head_size: int, chunk_size: int) -> nn.Module:
    """An untrained model. The SSM's residual width is `hidden_size` and its embedding has that width
    too; `embed_size` sizes the recurrent cells' embedding only."""
    if arch == "ssm":
        return SelectiveSSMLM(SSMConfig(vocab_size, hidden_size, layers, state_size, head_size,
                                        chunk_size=chunk_size, dropout=dropout))
    if arch in CELLS:
        return RecurrentLM(ModelConfig(arch, vocab_size, embed_size, hidden_size, layers, dropout))
    raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")


def rebuild_model(arch: str, model_config: dict) -> nn.Module:
    """The untrained model a checkpoint's `arch` and `model_config` describe, ready for its weights."""
    return SelectiveSSMLM(SSMConfig(**model_config)) if arch == "ssm" else RecurrentLM(ModelConfig(**model_config))
