"""The recurrent language model: one module for the Elman RNN, the GRU and the LSTM.

The same `forward` runs a whole sequence (training, prefill) and a single step (T = 1); the
state goes in and comes out, so a caller can carry it across chunks or across requests.
State tensors are batch-major, `[batch, layers, hidden]`, the layout the server keeps in its
state pool: a session's state is then one contiguous row, and a batch is a gather of rows that
feeds the exported graph without a transpose on the host.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

CELLS = ("rnn", "gru", "lstm")


@dataclass(frozen=True)
class ModelConfig:
    cell: str = "lstm"
    vocab_size: int = 100
    embed_size: int = 128
    hidden_size: int = 512
    layers: int = 2
    dropout: float = 0.0

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")

    @property
    def state_names(self) -> tuple[str, ...]:
        """An LSTM carries a hidden and a cell state; the Elman RNN and the GRU only a hidden state."""
        return ("h", "c") if self.cell == "lstm" else ("h",)

    def to_dict(self) -> dict:
        return asdict(self)


class RecurrentLM(nn.Module):
    """Embedding -> stacked recurrent cells -> linear head over the vocabulary."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        recurrent = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[config.cell]
        self.embed = nn.Embedding(config.vocab_size, config.embed_size)
        self.drop = nn.Dropout(config.dropout)
        self.rnn = recurrent(config.embed_size, config.hidden_size, num_layers=config.layers,
                             dropout=config.dropout if config.layers > 1 else 0.0, batch_first=True)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The export contract's declaration: each state's shape without the batch axis, in order."""
        return {name: (self.config.layers, self.config.hidden_size) for name in self.config.state_names}

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Zeros, one tensor per state name, each [batch, layers, hidden]."""
        return tuple(torch.zeros((batch, *shape)) for shape in self.state_shapes().values())

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """tokens [batch, time] int64, state tensors [batch, layers, hidden].

        Returns (logits [batch, time, vocab], *new_state [batch, layers, hidden]).
        """
        x = self.drop(self.embed(tokens))  # [B, T, E]
        layer_major = tuple(s.transpose(0, 1).contiguous() for s in state)  # [L, B, H]
        packed = layer_major if self.config.cell == "lstm" else layer_major[0]
        out, new = self.rnn(x, packed)  # out [B, T, H]
        logits = self.head(self.drop(out))  # [B, T, V]
        new = new if isinstance(new, tuple) else (new,)
        return (logits, *(s.transpose(0, 1) for s in new))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
