"""Named states: states a session may start from instead of zeros, shipped in the bundle or registered by name.

A named state registered from a prompt is the state after reading that prompt from zeros; it is
also pinned in the prefix-state cache, so a session whose prompt starts with it skips reading it.
Used as a session's initial state (what RWKV servers call state tuning), it is that session's
position 0: reset and rewind go back to it. Rows are never written once named, so every session
started from one shares them until it steps (the pool holds each session's own copy).

A state a caller registers belongs to that caller's identity, as a session does: only it lists,
uses, replaces or deletes the state, and to any other identity the name does not exist (its
prompt is pinned in that identity's partition of the cache). States for everyone are shipped in
the bundle or registered through Admin; callers may use and list them but not change them. A
caller's own state of a name hides a shared state of the same name from that caller alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rnnserve.bundle import Bundle
from rnnserve.initial_states import ShippedState
from rnnserve.server.core.batcher import NEXT_LOGITS
from rnnserve.server.core.errors import IdentityQuotaExhausted, InvalidArgument, StateIsShipped, StateNotFound
from rnnserve.server.core.prefix_cache import EVERYONE, PrefixCache
from rnnserve.server.model.state_pool import Row

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
SHIPPED = "bundle"
REGISTERED = "registered"  # by a caller, for its own identity
SHARED = "shared"  # through Admin, for every caller
IMPORTED = "imported"  # came with an imported session: that session's own, in no registry


@dataclass(frozen=True, slots=True)
class NamedState:
    name: str
    source: str  # SHIPPED, REGISTERED, SHARED or IMPORTED
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
    def __init__(self, cache: PrefixCache, shipped: Sequence[NamedState] = (), max_per_owner: int = 0):
        """`max_per_owner`: the most states one identity may register (each a pinned row); 0 for no bound."""
        self._cache = cache
        self.max_per_owner = max_per_owner
        self._shared = {state.name: state for state in shipped}
        self._owned: dict[str, dict[str, NamedState]] = {}  # identity -> its own states by name
        for state in shipped:
            if state.tokens is not None:
                cache.pin(EVERYONE, state.tokens, state.rows)

    def _visible(self, owner: str) -> dict[str, NamedState]:
        """The states `owner` may use, by name: the shared ones and its own, its own first."""
        return {**self._shared, **self._owned.get(owner, {})}

    def get(self, owner: str, name: str) -> NamedState:
        state = self._visible(owner).get(name)
        if state is None:
            raise StateNotFound(name, sorted(self._visible(owner)))
        return state

    def all(self, owner: str) -> list[NamedState]:
        """What `owner` may use: no other identity's state, and no shared state its own of that name hides."""
        visible = self._visible(owner)
        return [visible[name] for name in sorted(visible)]

    def register(self, owner: str, name: str, tokens: np.ndarray, rows: Row) -> NamedState:
        """Name the state after `tokens` for `owner`, replacing its own state of that name; a shared name is
        refused (read-only to callers)."""
        own = self._owned.get(owner, {})
        if name in self._shared and name not in own:
            raise _read_only(self._shared[name])
        if self.max_per_owner and name not in own and len(own) >= self.max_per_owner:
            raise IdentityQuotaExhausted(self.max_per_owner, "named states", "delete one first",
                                         "max_states_per_identity")
        return self._name(self._owned.setdefault(owner, {}), owner, name, tokens, rows, REGISTERED)

    def register_shared(self, name: str, tokens: np.ndarray, rows: Row) -> NamedState:
        """Name the state after `tokens` for every caller (Admin), replacing a shared state but never a shipped one."""
        if (shipped := self._shared.get(name)) is not None and shipped.source == SHIPPED:
            raise _read_only(shipped)
        return self._name(self._shared, EVERYONE, name, tokens, rows, SHARED)

    def _name(self, states: dict[str, NamedState], owner: str | None, name: str, tokens: np.ndarray, rows: Row,
              source: str) -> NamedState:
        entry = self._cache.pin(owner, tokens, rows)
        previous = states.get(name)
        state = states[name] = NamedState(name, source, entry.rows, entry.tokens)
        if previous is not None:
            self._cache.unpin(owner, previous.tokens)
        return state

    def delete(self, owner: str, name: str) -> None:
        """Forget `owner`'s own state `name`; a shared one is refused, another identity's is not found."""
        own = self._owned.get(owner, {})
        if name not in own:
            raise _read_only(self.get(owner, name))  # StateNotFound unless it is a shared one
        self._cache.unpin(owner, own.pop(name).tokens)
        if not own:
            del self._owned[owner]

    def delete_shared(self, name: str) -> None:
        """Forget a state registered for everyone (Admin); a shipped one is refused."""
        state = self._shared.get(name)
        if state is None:
            raise StateNotFound(name, sorted(self._shared))
        if state.source == SHIPPED:
            raise _read_only(state)
        del self._shared[name]
        self._cache.unpin(EVERYONE, state.tokens)


def _read_only(state: NamedState) -> StateIsShipped:
    return StateIsShipped(state.name, "ships with the model's bundle" if state.source == SHIPPED
                          else "is shared with every caller (registered through Admin)")
