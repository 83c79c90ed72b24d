"""A Mamba-2-style selective state-space language model whose graph holds no recurrent ONNX op.

Each layer keeps two states: the causal convolution's last `conv_width - 1` inputs
`[layers, conv_width - 1, channels]` and the state-space state `[layers, heads, head_size, state_size]`.
The recurrence of one head is S_t = a_t S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t + D x_t, with a scalar
decay a_t = exp(dt_t A) chosen by the input (the "selective" part). A prefill of T tokens computes it
with the chunked scan of Mamba-2's state-space duality (Dao & Gu, 2024): inside a chunk a masked,
attention-like product; across chunks the decayed chunk states. No step of it loops over time, so the
exported graph is the same few matrix products for any T, and every shape it uses (the chunk length,
the number of chunks) is computed from the input, so one graph serves single steps and prefills.
At T = 1 the chunk is one token long and the same formula is the recurrence itself.

Simplifications beside Mamba-2: B and C are shared by all heads (one group), and the gate is a plain
SiLU before the output RMSNorm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class SSMConfig:
    vocab_size: int = 100
    model_size: int = 256     # the residual stream's width
    layers: int = 2
    state_size: int = 32      # N: the state each head keeps per channel
    head_size: int = 32       # P: channels per head
    expand: int = 2           # inner width = expand * model_size
    conv_width: int = 4
    chunk_size: int = 32      # prefill chunk: quadratic inside, linear across
    dropout: float = 0.0

    def __post_init__(self):
        if (self.expand * self.model_size) % self.head_size:
            raise ValueError(f"expand * model_size ({self.expand * self.model_size}) must be a multiple of "
                             f"head_size ({self.head_size})")

    @property
    def inner_size(self) -> int:
        return self.expand * self.model_size

    @property
    def heads(self) -> int:
        return self.inner_size // self.head_size

    @property
    def conv_channels(self) -> int:
        """The convolution runs over x, B and C together, as in Mamba-2."""
        return self.inner_size + 2 * self.state_size

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """Written out rather than nn.RMSNorm so that the graph needs no opset beyond 17."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def segment_sums(log_a: torch.Tensor) -> torch.Tensor:
    """[..., l] -> [..., l, l]: out[i, j] = sum of log_a[j+1 .. i] for j <= i, -inf above the diagonal.

    Summed segment by segment rather than as a difference of two cumulative sums: the difference
    loses the small sums of a long, strongly decaying prefix to float32 rounding.
    """
    length = log_a.shape[-1]
    positions = torch.arange(length, device=log_a.device)
    below = positions[:, None] > positions[None, :]
    on_or_below = positions[:, None] >= positions[None, :]
    repeated = log_a.unsqueeze(-1).expand(*log_a.shape, length)  # [..., i, j] = log_a[i]
    sums = torch.cumsum(repeated.masked_fill(~below, 0.0), dim=-2)
    return sums.masked_fill(~on_or_below, -math.inf)


def chunked_scan(x: torch.Tensor, log_a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, state: torch.Tensor,
                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective recurrence over T tokens in chunks, without a loop over time.

    x [B, T, H, P] (inputs already scaled by dt), log_a [B, T, H] (log decays, <= 0), b and c [B, T, N],
    state [B, H, P, N]. Returns y [B, T, H, P] (without the D skip) and the state after token T.
    The sequence is padded to whole chunks with log_a = 0 and x = 0, which carry the state unchanged.
    """
    batch, time = x.shape[0], x.shape[1]
    length = torch.clamp(torch.as_tensor(time), max=chunk_size)
    chunks = torch.div(time + length - 1, length, rounding_mode="floor")
    pad = chunks * length - time

    def to_chunks(t: torch.Tensor) -> torch.Tensor:
        padding = torch.zeros((batch, pad, *t.shape[2:]), dtype=t.dtype, device=t.device)
        t = torch.cat([t, padding], dim=1)
        return t.reshape(batch, chunks, length, *t.shape[2:])

    x, b, c = to_chunks(x), to_chunks(b), to_chunks(c)       # [B, c, l, H, P], [B, c, l, N]
    log_a = to_chunks(log_a).permute(0, 3, 1, 2)             # [B, H, c, l]
    cumulative = torch.cumsum(log_a, dim=-1)                 # decay from the chunk's start to i
    within = torch.exp(segment_sums(log_a))                  # [B, H, c, l, l]
    # 1. Inside each chunk: y_i = sum_{j <= i} (C_i . B_j) decay(j -> i) x_j
    y = torch.einsum("bcin,bcjn,bhcij,bcjhp->bcihp", c, b, within, x)
    # 2. What each chunk adds to the state at its end: decay from j to the chunk's last token
    to_end = within[..., -1, :]                               # [B, H, c, l]
    chunk_states = torch.einsum("bcjn,bhcj,bcjhp->bchpn", b, to_end, x)
    # 3. Across chunks: the state entering each chunk, from the initial state and the chunks before
    states = torch.cat([state.unsqueeze(1), chunk_states], dim=1)           # [B, c+1, H, P, N]
    chunk_decay = F.pad(cumulative[..., -1], (1, 0))                        # [B, H, c+1]
    across = torch.exp(segment_sums(chunk_decay))                           # [B, H, c+1, c+1]
    entering = torch.einsum("bhzc,bchpn->bzhpn", across, states)            # [B, c+1, H, P, N]
    # 4. The entering state's contribution inside each chunk
    y = y + torch.einsum("bcin,bchpn,bhci->bcihp", c, entering[:, :-1], torch.exp(cumulative))
    y = y.reshape(batch, chunks * length, *y.shape[3:])[:, :time]
    return y, entering[:, -1]


class SSMBlock(nn.Module):
    """One residual layer: RMSNorm -> projections -> causal conv -> selective scan -> gate -> projection."""

    def __init__(self, config: SSMConfig):
        super().__init__()
        self.config = config
        inner, heads, n = config.inner_size, config.heads, config.state_size
        self.norm = RMSNorm(config.model_size)
        self.in_proj = nn.Linear(config.model_size, 2 * inner + 2 * n + heads, bias=False)
        self.conv = nn.Conv1d(config.conv_channels, config.conv_channels, config.conv_width,
                              groups=config.conv_channels)
        # Decay rates spread over [1, 16] and steps over [1e-3, 1e-1], Mamba-2's initialisation.
        self.log_rate = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, heads)))
        dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), heads))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.skip = nn.Parameter(torch.ones(heads))
        self.out_norm = RMSNorm(inner)
        self.out_proj = nn.Linear(inner, config.model_size, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor, conv_state: torch.Tensor,
                ssm_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [B, T, D], conv_state [B, W-1, channels], ssm_state [B, H, P, N]."""
        config = self.config
        batch, time = hidden.shape[0], hidden.shape[1]
        inner, n = config.inner_size, config.state_size
        z, xbc, dt = self.in_proj(self.norm(hidden)).split([inner, inner + 2 * n, config.heads], dim=-1)
        window = torch.cat([conv_state, xbc], dim=1)                     # [B, W-1+T, channels]
        new_conv_state = window[:, -(config.conv_width - 1):]
        xbc = F.silu(self.conv(window.transpose(1, 2)).transpose(1, 2))  # [B, T, channels]
        x, b, c = xbc.split([inner, n, n], dim=-1)
        x = x.reshape(batch, time, config.heads, config.head_size)
        dt = F.softplus(dt + self.dt_bias)                               # [B, T, H]
        log_a = -torch.exp(self.log_rate) * dt
        y, new_ssm_state = chunked_scan(x * dt.unsqueeze(-1), log_a, b, c, ssm_state, config.chunk_size)
        y = y + x * self.skip[:, None]
        y = self.out_norm(y.reshape(batch, time, inner) * F.silu(z))
        return hidden + self.drop(self.out_proj(y)), new_conv_state, new_ssm_state


class SelectiveSSMLM(nn.Module):
    """Embedding -> SSM blocks -> RMSNorm -> linear head; forward(tokens, conv, ssm) -> (logits, conv, ssm)."""

    def __init__(self, config: SSMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.model_size)
        self.blocks = nn.ModuleList(SSMBlock(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.model_size)
        self.head = nn.Linear(config.model_size, config.vocab_size)
        self.drop = nn.Dropout(config.dropout)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        config = self.config
        return {"conv": (config.layers, config.conv_width - 1, config.conv_channels),
                "ssm": (config.layers, config.heads, config.head_size, config.state_size)}

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros((batch, *shape)) for shape in self.state_shapes().values())

    def forward(self, tokens: torch.Tensor, conv: torch.Tensor,
                ssm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [B, T] int64, conv [B, layers, W-1, channels], ssm [B, layers, H, P, N]."""
        hidden = self.drop(self.embed(tokens))
        new_conv, new_ssm = [], []
        for index, block in enumerate(self.blocks):
            hidden, conv_state, ssm_state = block(hidden, conv[:, index], ssm[:, index])
            new_conv.append(conv_state)
            new_ssm.append(ssm_state)
        logits = self.head(self.drop(self.norm(hidden)))
        return logits, torch.stack(new_conv, dim=1), torch.stack(new_ssm, dim=1)
