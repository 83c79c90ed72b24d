"""The session table: ids, owners, positions, expiry, the session cap, and each session's slot.

One table holds the sessions of every loaded model: `--max-sessions` is the process's budget,
whichever models the sessions run. A session belongs to one model version for its whole life
(`Session.model`): its slot is in that version's state pool, its events go to that version's
metrics.

Nothing else creates, advances or removes sessions. Expiry costs nothing per token: sessions
sharing a time-to-live expire in the order they were last active, so each TTL keeps its
sessions in one ordered dict (moving a session to its end on every step is O(1)), and the
periodic sweep pops expired sessions off the fronts and stops at the first live one.

What happens to sessions (created, removed and why, refused for capacity) is reported to
`SessionEvents`, which the metrics module implements.
"""

from __future__ import annotations

import enum
import heapq
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from rnnserve.server.core.errors import (CapacityExhausted, InvalidArgument, PositionMismatch, RnnserveError,
                                         SessionEvicted, SessionExpired, SessionNotFound, SessionUnavailable)
from rnnserve.server.core.history import Checkpoint, History
from rnnserve.server.core.lines import Line
from rnnserve.server.core.quotas import OwnerQuota

if TYPE_CHECKING:
    from rnnserve.server.core.batcher import StepAnswer
    from rnnserve.server.core.named_states import NamedState
    from rnnserve.server.core.served_model import ServedModel


class SessionEvents(Protocol):
    """Where the table reports what happens to sessions, as plain numbers."""

    def record_session_created(self) -> None: ...

    def record_session_restored(self) -> None: ...

    def record_session_ended(self, reason: str, tokens: int, age_seconds: float) -> None: ...

    def record_capacity_refusal(self) -> None: ...


class Removal(enum.Enum):
    """Why a session left the table; remembered so that NOT_FOUND can say which."""

    CLOSED = "closed"
    EXPIRED = "expired"
    EVICTED = "evicted"
    MOVED = "moved"  # hibernated or handed over to the session store: live again wherever it is next named

    def error(self, session_id: str) -> RnnserveError:
        if self is Removal.MOVED:
            return SessionUnavailable(session_id, "moved to the session store while this call waited")
        if self is Removal.EXPIRED:
            return SessionExpired(session_id)
        if self is Removal.EVICTED:
            return SessionEvicted(session_id)
        return SessionNotFound(session_id, "was closed")


@dataclass(eq=False, slots=True)
class Session:
    id: str
    slot: int  # its rows in the state pool
    owner: str
    ttl: float  # idle seconds before it expires
    created: float  # time.monotonic()
    created_wall: float  # time.time() at the same moment: wall clock for the API, monotonic for expiry
    last_active: float  # time.monotonic() of its last step
    recency: OrderedDict[str, Session] = field(repr=False)  # its TTL group in the table, oldest activity first
    model: ServedModel = field(repr=False)  # the model version it runs, for its whole life
    line: Line = field(default_factory=Line, repr=False)
    position: int = 0  # tokens consumed
    # The last step applied, so that an exact retry is answered from it instead of applied twice.
    last_start: int = -1
    last_tokens: np.ndarray | None = field(default=None, repr=False)  # [time] int64
    last_answer: StepAnswer | None = field(default=None, repr=False)
    removed: Removal | None = None
    initial: NamedState | None = field(default=None, repr=False)  # what position 0 is; None for zeros
    history: History | None = field(default=None, repr=False)  # for rewinding; None with rewinding off

    @property
    def initial_checkpoint(self) -> Checkpoint:
        return Checkpoint(0, None if self.initial is None else self.initial.rows)

    @property
    def rewindable(self) -> int:
        return 0 if self.history is None else self.history.rewindable

    @property
    def has_prediction(self) -> bool:
        """Whether its next-token logits mean anything: a session from zeros predicts nothing before its first token."""
        return self.position > 0 or self.initial is not None

    @property
    def expires(self) -> float:
        return self.last_active + self.ttl

    def wall(self, monotonic: float) -> float:
        """A monotonic instant of this session as wall-clock seconds since the epoch."""
        return self.created_wall + (monotonic - self.created)

    def ensure_live(self) -> None:
        """Raise the right NOT_FOUND for work that reaches a session after it was removed."""
        if self.removed is not None:
            raise self.removed.error(self.id)

    def check_position(self, expected: int | None) -> None:
        if expected is not None and expected != self.position:
            raise PositionMismatch(self.id, expected, self.position)

    def replay(self, expected: int, tokens: np.ndarray) -> StepAnswer:
        """The stored answer when this is an exact retry of the last step; PositionMismatch otherwise."""
        if (expected == self.last_start and self.last_tokens is not None and self.last_answer is not None
                and np.array_equal(tokens, self.last_tokens)):
            return self.last_answer
        raise PositionMismatch(self.id, expected, self.position)

    def advance(self, tokens: np.ndarray, answer: StepAnswer, now: float) -> None:
        """Commit a step that ran: only called once nothing about it can fail any more."""
        self.last_start, self.last_tokens, self.last_answer = self.position, tokens, answer
        self.position = answer.position
        self.touch(now)

    def move_to(self, position: int, now: float) -> None:
        """Commit a jump that was no step (a reset, a rewind, a cached prompt): no step to retry exactly any more."""
        self.last_start, self.last_tokens, self.last_answer = -1, None, None
        self.position = position
        self.touch(now)

    def touch(self, now: float) -> None:
        self.last_active = now
        self.recency.move_to_end(self.id)


class SessionTable:
    def __init__(self, *, max_sessions: int, evict_when_full: bool, remember_removed: int, rewind_depth: int = 0,
                 rewind_checkpoint_every: int = 1, max_sessions_per_owner: int = 0):
        self.rewind_depth = rewind_depth
        self.rewind_checkpoint_every = rewind_checkpoint_every
        self.max_sessions = max_sessions
        self.owners = OwnerQuota(max_sessions_per_owner)
        self.evict_when_full = evict_when_full
        self.remember_removed = remember_removed
        self._sessions: dict[str, Session] = {}
        self._by_ttl: dict[float, OrderedDict[str, Session]] = {}
        self._removed: OrderedDict[str, tuple[Removal, str]] = OrderedDict()  # id -> (why, owner)

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, owner: str, ttl: float, model: ServedModel, initial: NamedState | None = None,
               session_id: str = "") -> Session:
        """A new session of `model` at position 0: zeros, or the named state `initial` (one of `model`'s); its id
        `session_id` when given (derived by a face from names of the caller's, a Triton sequence's), which no live
        session may hold, else a random one."""
        if session_id in self._sessions:
            raise InvalidArgument("session_id", "a live session already has this id: close it first")
        session = self._new(owner, ttl, model, session_id)
        if initial is not None:  # a new slot is zeros already
            session.initial = initial
            model.pool.set_rows(session.slot, initial.rows)
        session.history = self.new_history(session.initial_checkpoint)
        return session

    def fork(self, source: Session, count: int, ttl: float) -> list[Session]:
        """`count` new sessions of `owner` where `source` is now; none when the table cannot take them all."""
        forks: list[Session] = []
        try:
            for _ in range(count):
                forks.append(self._new(source.owner, ttl, source.model))
        except BaseException:  # the table full, or the owner at its own cap: all or none
            for fork in forks:
                self.remove(fork, Removal.CLOSED)
            raise
        for fork in forks:
            source.model.pool.copy_row(source.slot, fork.slot)
            fork.initial, fork.position = source.initial, source.position
            fork.history = None if source.history is None else source.history.copy()
        return forks

    def new_history(self, base: Checkpoint) -> History | None:
        """A history starting at `base`; None with rewinding off."""
        if not self.rewind_depth:
            return None
        return History.starting_at(self.rewind_depth, self.rewind_checkpoint_every, base)

    def _new(self, owner: str, ttl: float, model: ServedModel, session_id: str = "") -> Session:
        now = time.monotonic()
        # 128 random bits, in hex: an id never starts with '-', which a shell command would read as a flag
        session = self._add(session_id or secrets.token_hex(16), owner, ttl, model, now, time.time(), now)
        if model.events is not None:
            model.events.record_session_created()
        return session

    def restore(self, session_id: str, owner: str, ttl: float, model: ServedModel, created_wall: float,
                last_active_wall: float, position: int,
                last_step: tuple[int, np.ndarray, StepAnswer] | None) -> Session:
        """Re-admit a session from a snapshot with its id, owner, wall-clock times, position and last step.

        Its idle time goes on from where it was, so a restart neither renews nor shortens its TTL.
        Restore sessions most recently active first, as `by_recency` lists them: each joins its TTL
        group at the front, which keeps the group in the sweep's order. The caller fills its rows.
        """
        now, wall = time.monotonic(), time.time()
        session = self._add(session_id, owner, ttl, model, now - (wall - created_wall), created_wall,
                            now - max(0.0, wall - last_active_wall))
        if model.events is not None:
            model.events.record_session_restored()
        session.recency.move_to_end(session_id, last=False)
        session.position = position
        if last_step is not None:
            session.last_start, session.last_tokens, session.last_answer = last_step
        return session

    def _add(self, session_id: str, owner: str, ttl: float, model: ServedModel, created: float, created_wall: float,
             last_active: float) -> Session:
        self.owners.check(owner)  # first: an owner at its own cap must not evict anyone's session
        if len(self._sessions) >= self.max_sessions:
            self._make_room(model)
        recency = self._by_ttl.setdefault(ttl, OrderedDict())
        session = Session(session_id, model.pool.allocate(), owner, ttl, created, created_wall, last_active, recency,
                          model)
        self._sessions[session_id] = recency[session_id] = session
        self.owners.added(owner)
        model.joined(owner)
        return session

    def by_recency(self) -> list[Session]:
        """Every session held, the most recently active first (a merge of the TTL groups, each already in order)."""
        groups = (reversed(recency.values()) for recency in self._by_ttl.values())
        return list(heapq.merge(*groups, key=lambda session: session.last_active, reverse=True))

    def get(self, session_id: str, owner: str) -> Session:
        """The live session `session_id` of `owner`; the right NOT_FOUND otherwise.

        Another owner's session, live or removed, answers exactly like one that never existed, so ids
        cannot be probed.
        """
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            reason, removed_owner = self._removed.get(session_id, (None, None))
            raise reason.error(session_id) if reason and removed_owner == owner else SessionNotFound(session_id)
        if session.expires <= time.monotonic() and not session.line.busy:
            self.remove(session, Removal.EXPIRED)
            raise SessionExpired(session_id)
        return session

    def held(self, session_id: str) -> Session | None:
        """The session `session_id` if this table holds it, whoever owns it: for moving it, never for answering."""
        return self._sessions.get(session_id)

    def removal(self, session_id: str) -> Removal | None:
        """Why `session_id` left this table, if it is among those remembered."""
        return self._removed.get(session_id, (None, None))[0]

    def idle(self, before: float, limit: int) -> list[Session]:
        """Up to `limit` sessions with no work in progress, last active before `before` (time.monotonic())."""
        found: list[Session] = []
        for recency in self._by_ttl.values():
            for session in recency.values():
                if session.last_active >= before or len(found) >= limit:
                    break  # the rest of this TTL group was active later still
                if not session.line.busy:
                    found.append(session)
        return found

    def remove(self, session: Session, reason: Removal) -> None:
        """Free the session's slot; work still waiting in its line finds it removed and fails NOT_FOUND."""
        del self._sessions[session.id]
        del session.recency[session.id]
        if not session.recency:
            del self._by_ttl[session.ttl]
        session.model.pool.free(session.slot)
        self.owners.removed(session.owner)
        session.removed = reason
        self._removed[session.id] = reason, session.owner
        if len(self._removed) > self.remember_removed:
            self._removed.popitem(last=False)
        events = session.model.events
        if events is not None:
            events.record_session_ended(reason.value, session.position, time.monotonic() - session.created)
        session.model.left(session.owner)

    def expire(self, now: float) -> int:
        """Remove every idle session whose time-to-live has passed; return how many."""
        expired = []
        for recency in self._by_ttl.values():
            for session in recency.values():
                if session.expires > now:
                    break  # the rest of this TTL group was active later still
                if not session.line.busy:
                    expired.append(session)
        for session in expired:
            self.remove(session, Removal.EXPIRED)
        return len(expired)

    def _make_room(self, model: ServedModel) -> None:
        """Evict, or refuse the session of `model` that would not fit."""
        victim = self._least_recently_active_idle() if self.evict_when_full else None
        if victim is None:
            if model.events is not None:
                model.events.record_capacity_refusal()
            raise CapacityExhausted(self.max_sessions)
        self.remove(victim, Removal.EVICTED)

    def _least_recently_active_idle(self) -> Session | None:
        """The eviction candidate: each TTL group's oldest idle session, the oldest of those."""
        candidates = (next((s for s in recency.values() if not s.line.busy), None) for recency in self._by_ttl.values())
        return min((s for s in candidates if s is not None), key=lambda s: s.last_active, default=None)
