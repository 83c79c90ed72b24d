"""What a session keeps so that it can be rewound: a few checkpoint rows and the tokens read since the oldest.

Rewinding to position t restores the latest checkpoint at or before t and replays the kept tokens
from there to t in one model call, so a session predicts afterwards as if it had never read what
was undone. Two settings bound the cost (`--rewind-depth` D, `--rewind-checkpoint-every` k):

- a checkpoint is taken when a step crosses a multiple of k (a prompt crossing several takes one,
  at its end); the oldest is dropped once a later one lies D or more tokens back, so at most
  about D/k + 2 checkpoints are held, each one row of the state pool;
- the token log (4 bytes a token) reaches back to the oldest checkpoint: about D + k tokens, and
  after a long prompt, the prompt too until the session has read D more tokens;
- a replay reads at most D + k tokens, or a prompt and D tokens, in one model call.

The base checkpoint of a new session is its initial state at position 0, held by reference (no
copy): zeros, or the named state it started from. Checkpoint rows are never written once taken,
so forks share them.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np

from rnnserve.server.model.state_pool import Row, StatePool

TOKEN_TYPE = "i"  # array typecode of the token log: int32, ample for any vocabulary


@dataclass(frozen=True, slots=True)
class Checkpoint:
    position: int
    rows: Row | None  # the state at `position`; None for zeros (the initial state of a session from zeros)


@dataclass(frozen=True, slots=True)
class Replay:
    """How to reach a position: restore `start`, then read `tokens` (none when the checkpoint is the target)."""

    start: Checkpoint
    tokens: np.ndarray  # [time] int64


class History:
    __slots__ = ("depth", "every", "checkpoints", "tokens")  # one per session: no per-instance dict

    def __init__(self, depth: int, every: int, checkpoints: list[Checkpoint], tokens: array):
        self.depth = depth
        self.every = every
        self.checkpoints = checkpoints  # oldest first; never empty
        self.tokens = tokens  # what was read since checkpoints[0].position

    @classmethod
    def starting_at(cls, depth: int, every: int, base: Checkpoint) -> History:
        return cls(depth, every, [base], array(TOKEN_TYPE))

    @property
    def position(self) -> int:
        return self.checkpoints[0].position + len(self.tokens)

    @property
    def rewindable(self) -> int:
        """How many of the last tokens can be undone now: back to the oldest checkpoint, at most the depth."""
        return min(self.depth, len(self.tokens))

    def record(self, tokens: np.ndarray, pool: StatePool, slot: int) -> None:
        """The session at `slot` of `pool` has read `tokens` (its rows already hold the state after them)."""
        start = self.position
        self.tokens.extend(tokens.tolist())
        end = start + len(tokens)
        if start // self.every != end // self.every:
            self.checkpoints.append(Checkpoint(end, pool.rows(slot)))
            self._forget_before(end - self.depth)

    def _forget_before(self, position: int) -> None:
        """Drop the checkpoints (and their tokens) that a rewind of at most the depth can no longer need."""
        while len(self.checkpoints) > 1 and self.checkpoints[1].position <= position:
            del self.tokens[: self.checkpoints[1].position - self.checkpoints[0].position]
            del self.checkpoints[0]

    def replay_to(self, position: int) -> Replay:
        """The checkpoint and tokens that reach `position`, which must be within `rewindable` of the end."""
        start = next(c for c in reversed(self.checkpoints) if c.position <= position)
        base = self.checkpoints[0].position
        tokens = np.array(self.tokens[start.position - base: position - base], np.int64)
        return Replay(start, tokens)

    def truncate(self, position: int) -> None:
        """Forget what was read after `position`: the session was rewound there."""
        self.checkpoints = [c for c in self.checkpoints if c.position <= position]
        del self.tokens[position - self.checkpoints[0].position:]

    def copy(self) -> History:
        """An independent history with the same past (checkpoint rows are shared: they are never written)."""
        return History(self.depth, self.every, list(self.checkpoints), array(TOKEN_TYPE, self.tokens))
