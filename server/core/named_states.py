"""Named states: states a session may start from instead of zeros, shipped in the bundle or registered by name.

A named state registered from a prompt is the state after reading that prompt from zeros; it is
also pinned in the prefix-state cache, so a session whose prompt starts with it skips reading it.
Used as a session's initial state (what RWKV servers call state tuning), it is that session's
position 0: reset and rewind go back to it. Rows are never written once named, so every session
started from one shares them until it steps (the pool holds each session's own copy).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rnnserve.bundle import Bundle
from rnnserve.initial_states import ShippedState
from rnnserve.server.core.batcher import NEXT_LOGITS
from rnnserve.server.core.errors import InvalidArgument, StateIsShipped, StateNotFound
from rnnserve.server.core.prefix_cache import PrefixCache
from rnnserve.server.model.state_pool import Row

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
SHIPPED = "bundle"
REGISTERED = "registered"
IMPORTED = "imported"  # came with an imported session: that session's own, in no registry


@dataclass(frozen=True, slots=True)
class NamedState:
    name: str
    source: str  # SHIPPED, REGISTERED or IMPORTED
    rows: Row  # the state and next-token logits
    tokens: np.ndarray | None  # [time] int64, the prompt it is the state after; None when not known


def shipped_state(shipped: ShippedState, bundle: Bundle) -> NamedState:
    """A state shipped in the bundle, as the pool's rows (the state tensors and the next-token logits)."""
    tokens = bundle.vocab.encode(shipped.prompt) if shipped.prompt else None
    return NamedState(shipped.name, SHIPPED, {**shipped.states, NEXT_LOGITS: shipped.next_logits}, tokens)


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument("name", "1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'")
    return name


class NamedStates:
    def __init__(self, cache: PrefixCache, shipped: Sequence[NamedState] = ()):
        self._cache = cache
        self._states = {state.name: state for state in shipped}
        for state in shipped:
            if state.tokens is not None:
                cache.pin(state.tokens, state.rows)

    def get(self, name: str) -> NamedState:
        state = self._states.get(name)
        if state is None:
            raise StateNotFound(name, sorted(self._states))
        return state

    def all(self) -> list[NamedState]:
        return [self._states[name] for name in sorted(self._states)]

    def register(self, name: str, tokens: np.ndarray, rows: Row) -> NamedState:
        """Name the state after `tokens`, replacing a registered state of that name, and pin it in the cache."""
        previous = self._states.get(name)
        if previous is not None and previous.source == SHIPPED:
            raise StateIsShipped(name)
        entry = self._cache.pin(tokens, rows)
        state = self._states[name] = NamedState(name, REGISTERED, entry.rows, entry.tokens)
        if previous is not None:
            self._unpin(previous)
        return state

    def delete(self, name: str) -> None:
        state = self.get(name)
        if state.source == SHIPPED:
            raise StateIsShipped(name)
        del self._states[name]
        self._unpin(state)

    def _unpin(self, gone: NamedState) -> None:
        """Unpin the prompt of a state no longer named, unless another name still stands for the same prompt."""
        if not any(np.array_equal(state.tokens, gone.tokens) for state in self._states.values()):
            self._cache.unpin(gone.tokens)
