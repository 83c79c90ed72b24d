"""Tiny models beyond rnnserve-train's, written for the tests: a GRU over a byte-level BPE tokenizer and a
selective state-space layer whose state is `[layers, heads, head_dim, d_state]`. Random weights, a few
thousand parameters: what matters is that they keep the module contract, not what they predict.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rnnserve.export.bpe import train_byte_level_bpe

# Words with accents and a character outside the BMP, so that byte-level pieces split UTF-8 characters.
WORDS = ("the king queen crown sword night day love death speak hear lord lady good ill café naïve "
         "señor über straße 東京 🎭 résumé").split()


def tiny_corpus(seed: int = 7, lines: int = 120) -> str:
    """A few KB of seeded pseudo-verse: enough to train a small BPE tokenizer."""
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(WORDS, size=6)) + ".\n" for _ in range(lines))


def train_tokenizer(text: str, vocab_size: int = 300) -> str:
    """A byte-level BPE tokenizer trained on `text` as `rnnserve-train --tokenizer bpe` trains one, as its
    tokenizer.json."""
    return train_byte_level_bpe(text, vocab_size).to_str()


class TinySSM(nn.Module):
    """A Mamba-2-style selective state-space layer: per head, S_t = a_t S_(t-1) + x_t B_t^T, y_t = S_t C_t.

    A whole sequence runs as one masked (T x T) decay matrix, with no loop over time and no recurrent
    ONNX op; a single step is the same computation at T = 1, which is what parity checks.
    """

    def __init__(self, vocab_size: int, heads: int = 2, head_dim: int = 4, d_state: int = 3):
        super().__init__()
        self.heads, self.head_dim, self.d_state = heads, head_dim, d_state
        width = heads * head_dim
        self.embed = nn.Embedding(vocab_size, width)
        self.dt = nn.Linear(width, heads)
        self.a_log = nn.Parameter(torch.zeros(heads))
        self.b = nn.Linear(width, d_state)
        self.c = nn.Linear(width, d_state)
        self.head = nn.Linear(width, vocab_size)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"ssm": (1, self.heads, self.head_dim, self.d_state)}  # [layers, heads, head_dim, d_state]

    def forward(self, tokens: torch.Tensor, ssm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, time = tokens.shape
        emb = self.embed(tokens)  # [B, T, W]
        x = emb.view(batch, time, self.heads, self.head_dim)  # [B, T, H, P]
        log_a = -nn.functional.softplus(self.dt(emb)) * torch.exp(self.a_log) * 0.1  # [B, T, H], a in (0, 1)
        b, c = self.b(emb), self.c(emb)  # [B, T, N] each
        state = ssm[:, 0]  # [B, H, P, N]
        total = torch.cumsum(log_a, dim=1).transpose(1, 2)  # [B, H, T]
        gap = total.unsqueeze(-1) - total.unsqueeze(-2)  # [B, H, T(t), T(s)]: decay from s to t
        causal = torch.ones(time, time, dtype=torch.bool, device=tokens.device).tril()
        decay = torch.exp(torch.where(causal, gap, torch.full_like(gap, -1e9)))  # 0 above the diagonal
        scores = torch.einsum("btn,bsn->bts", c, b).unsqueeze(1) * decay  # [B, H, T, S]
        inside = torch.einsum("bhts,bshp->bthp", scores, x)  # [B, T, H, P]
        carried = torch.einsum("bhpn,btn->bthp", state, c) * torch.exp(total).transpose(1, 2).unsqueeze(-1)
        y = (inside + carried).reshape(batch, time, -1)  # [B, T, W]
        last = total[:, :, -1:]  # [B, H, 1]
        weights = torch.exp(last - total)  # [B, H, T]: decay from each s to the end
        new_state = (torch.exp(last).unsqueeze(-1) * state
                     + torch.einsum("bhs,bshp,bsn->bhpn", weights, x, b))  # [B, H, P, N]
        return self.head(y + emb), new_state.unsqueeze(1)


class TinyGRU(nn.Module):
    """A one-layer GRU language model declaring its state the contract's way."""

    def __init__(self, vocab_size: int, hidden: int = 16):
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(vocab_size, 8)
        self.rnn = nn.GRU(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"h": (1, self.hidden)}  # [layers, hidden]

    def forward(self, tokens: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, new = self.rnn(self.embed(tokens), h.transpose(0, 1).contiguous())  # out [B, T, H]
        return self.head(out), new.transpose(0, 1)
