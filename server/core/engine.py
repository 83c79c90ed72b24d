"""The service's operations, free of gRPC: the servicer translates, the engine decides.

It wires the pieces on the one straight path (session table -> batcher -> runtime, with the
state pool between them) and owns their background tasks: the scheduling loop, the sweep
that frees expired sessions (and gives the pool's unused rows back), and, with a snapshot
path, `durability`'s restore at start, periodic saves and the save at stop. With metrics, the
table, the batcher and the engine itself report to them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from rnnserve.bundle import Bundle
from rnnserve.initial_states import load_initial_states
from rnnserve.server.core.batcher import Batcher, StepAnswer
from rnnserve.server.store.durability import Durability
from rnnserve.server.core.errors import (InvalidArgument, ModelNotFound, RnnserveError, SessionNotFound,
                                    SessionUnavailable, ShuttingDown)
from rnnserve.server.core.generate import GeneratedToken, StopStrings, continue_session
from rnnserve.server.core.named_states import NamedStates, shipped_state
from rnnserve.server.core.operations import Operations
from rnnserve.server.core.prefix_cache import PrefixCache
from rnnserve.server.core.sampling import Sampler, SamplingParams
from rnnserve.server.core.sessions import Removal, Session, SessionTable
from rnnserve.server.metrics import Metrics
from rnnserve.server.model.memory import release_free_memory
from rnnserve.server.model.runtime import Runtime
from rnnserve.server.model.state_pool import StatePool
from rnnserve.server.settings import Settings
from rnnserve.server.store.snapshot import ModelIdentity

if TYPE_CHECKING:
    from rnnserve.server.store.hibernation import Hibernation

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepInput:
    tokens: np.ndarray  # [time] int64, time >= 1
    top_k: int
    temperature: float
    expected_position: int | None = None


@dataclass(frozen=True)
class CreateInput:
    model: str  # "" for the default
    ttl_seconds: int  # 0 for the default
    prompt: StepInput | None = None
    initial_state: str = ""  # a named state to start from; "" for zeros


class Created(NamedTuple):
    session: Session
    answer: StepAnswer | None  # the prediction after the prompt; None without one
    cached_tokens: int  # prompt tokens whose state came from the prefix-state cache


@dataclass(frozen=True)
class GenerateInput:
    tokens: np.ndarray | None  # [time] int64 to read before generating
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    expected_position: int | None = None


class Engine:
    def __init__(self, bundle: Bundle, settings: Settings, metrics: Metrics | None = None):
        self.bundle = bundle
        self.settings = settings
        self.metrics = metrics
        runtime = Runtime(bundle, settings.ort_threads, settings.ort_spins)
        self.pool = StatePool(Batcher.pool_rows(runtime), settings.max_sessions)
        self.table = SessionTable(self.pool, max_sessions=settings.max_sessions,
                                  max_sessions_per_owner=settings.max_sessions_per_identity,
                                  evict_when_full=settings.when_full == "evict-oldest",
                                  remember_removed=settings.remember_removed, rewind_depth=settings.rewind_depth,
                                  rewind_checkpoint_every=settings.rewind_checkpoint_every, events=metrics)
        self.batcher = Batcher(runtime, self.pool, max_batch_size=settings.max_batch_size,
                               max_batch_tokens=settings.max_batch_tokens,
                               max_queue_delay_seconds=settings.max_queue_delay_us / 1e6,
                               adaptive_wait_seconds=settings.adaptive_wait_us / 1e6,
                               loop_max_tokens=settings.loop_max_tokens,
                               on_batch=None if metrics is None else metrics.record_batch)
        self.cache = PrefixCache(bundle.sha256, max_entries=settings.prefix_cache_entries,
                                 max_bytes=settings.prefix_cache_bytes, min_tokens=settings.prefix_cache_min_tokens,
                                 row_bytes=self.pool.row_bytes, events=metrics)
        self.states = NamedStates(self.cache, [shipped_state(state, bundle) for state in load_initial_states(bundle)])
        self.operations = Operations(self.table, self.pool, self.batcher, self.states, ModelIdentity.of(bundle),
                                     self._accepting, self.find_session, self._made)
        self.hibernation = self._hibernation() if settings.redis_url else None
        if metrics is not None:
            metrics.watch_sessions(lambda: len(self.table), self.pool.row_bytes, settings.max_sessions)
            metrics.watch_prefix_cache(lambda: len(self.cache), lambda: self.cache.bytes)
        self.durability = (Durability(Path(settings.snapshot_path), settings.snapshot_interval_seconds, self.table,
                                      self.pool, bundle) if settings.snapshot_path else None)
        self._tasks: list[asyncio.Task] = []
        self._draining = False

    # Lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.durability is not None:
            self.durability.start()
        self._tasks = [asyncio.create_task(self.batcher.run(), name="rnnserve-batcher"),
                       asyncio.create_task(self._sweep(), name="rnnserve-sweep")]
        if self.hibernation is not None:
            self.hibernation.start()

    def _hibernation(self) -> Hibernation:
        """Sessions kept in Redis besides memory. Imported here: serving without Redis needs no Redis client."""
        from rnnserve.server.store.hibernation import Hibernation
        from rnnserve.server.store.session_store import SessionStore, replica_holder

        settings = self.settings
        store = SessionStore(settings.redis_url, replica_holder(settings.replica_id or default_replica_id(settings)),
                             lease_seconds=settings.redis_lease_seconds, timeout_seconds=settings.redis_timeout_seconds)
        return Hibernation(store, self.table, self.batcher, self.operations,
                           hibernate_after_seconds=settings.hibernate_after_seconds,
                           write_through_every=settings.write_through_every, sweep_seconds=settings.sweep_seconds,
                           events=self.metrics)

    def _made(self, session: Session) -> None:
        """A session a fork or an import made: registered in the session store as a created one is (its id routes
        it to any replica), without waiting for the write."""
        if self.hibernation is not None:
            self.hibernation.created(session)

    def drain(self) -> None:
        """Refuse new work (UNAVAILABLE); work already accepted goes on."""
        self._draining = True

    async def hand_off(self) -> None:
        """With a session store, move every session there (call after `drain`): another replica continues each."""
        if self.hibernation is not None:
            await self.hibernation.hand_off()

    async def stop(self) -> None:
        if self.hibernation is not None:
            await self.hibernation.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.durability is not None:
            await self.durability.stop()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_seconds)
            expired = self.table.expire(time.monotonic())
            if self.pool.shrink():
                release_free_memory()
            if expired:
                log.info("freed %d expired sessions; %d remain", expired, len(self.table))

    def _accepting(self) -> None:
        if self._draining:
            raise ShuttingDown()

    # Models ------------------------------------------------------------------------------------

    def model(self, name: str) -> Bundle:
        """The loaded model called `name`; "" is the default."""
        if name not in ("", self.bundle.name):
            raise ModelNotFound(name, [self.bundle.name])
        return self.bundle

    def models(self) -> list[Bundle]:
        return [self.bundle]

    # Sessions ----------------------------------------------------------------------------------

    async def create_session(self, owner: str, request: CreateInput) -> Created:
        """A new session, having read the prompt if there is one; no session is left behind on failure.

        A session from zeros starts from the longest prefix of its prompt in the prefix-state cache and
        reads only the rest; a prompt read (even partly) by the model is cached for the next session.
        """
        arrived = time.perf_counter()
        self._accepting()
        self.model(request.model)
        initial = self.states.get(request.initial_state) if request.initial_state else None
        session = self.table.create(owner, request.ttl_seconds or self.settings.default_ttl_seconds, initial)
        log.debug("created session %s", session.id)
        if request.prompt is None:
            return Created(session, None, 0)
        prompt = request.prompt
        try:
            cached = self._start_from_cache(session, prompt.tokens) if initial is None else 0
            rest = prompt.tokens[cached:]
            if len(rest):
                answer = await self.batcher.submit(session, rest, prompt.top_k, prompt.temperature)
                if initial is None:
                    self.cache.put(prompt.tokens, self.pool.rows(session.slot))
            else:
                answer = StepAnswer(cached, self.operations.prediction(session, prompt.top_k, prompt.temperature))
        except BaseException:
            self.table.remove(session, Removal.CLOSED)
            raise
        self._record_first_prediction(arrived)
        if self.hibernation is not None and (stored := self.hibernation.created(session)) is not None:
            await stored
        return Created(session, answer, cached)

    def _start_from_cache(self, session: Session, prompt: np.ndarray) -> int:
        """Put the session where the longest cached prefix of `prompt` leaves it; how many tokens that is."""
        hit = self.cache.longest_prefix(prompt)
        if hit is None:
            return 0
        self.pool.set_rows(session.slot, hit.rows)
        if session.history is not None:
            session.history.record(hit.tokens, self.pool, session.slot)
        session.move_to(len(hit.tokens), time.monotonic())
        return len(hit.tokens)

    async def find_session(self, session_id: str, owner: str) -> Session:
        """The live session `session_id` of `owner`; one not held here is woken from the session store, if any."""
        session = self._held(session_id, owner)
        if session is not None:
            return session
        self._accepting()
        return await self.hibernation.wake(session_id, owner)

    def _held(self, session_id: str, owner: str) -> Session | None:
        """The live session held here; None for a miss that may be in the session store (never seen here, or moved
        there); the table's answer for the rest (closed, expired, evicted, another owner's)."""
        try:
            return self.table.get(session_id, owner)
        except (SessionNotFound, SessionUnavailable):
            if self.hibernation is None or self.table.removal(session_id) not in (None, Removal.MOVED):
                raise
            return None

    def position_held(self, session_id: str, owner: str) -> int:
        """Where `owner`'s session held here stands; 0 when none is (never seen, gone, moved, another owner's)."""
        try:
            return self.table.get(session_id, owner).position
        except RnnserveError:
            return 0

    def refused_step(self, session_id: str, owner: str, error: RnnserveError) -> asyncio.Future:
        """A future failing with `error`, for a step refused before it could queue: in the step's turn when the
        session is the caller's (see `Batcher.refuse_in_turn`), at once otherwise."""
        try:
            return self.batcher.refuse_in_turn(self.table.get(session_id, owner), error)
        except RnnserveError:  # no such session of this owner: nothing to wait for, no position to report
            refused = asyncio.get_running_loop().create_future()
            refused.set_exception(error)
            return refused

    async def close_session(self, session_id: str, owner: str) -> int:
        """Close after the work queued before the close; work queued after it fails NOT_FOUND. Returns the position."""
        session = await self.find_session(session_id, owner)
        hold = await self.batcher.hold(session)
        try:
            session.ensure_live()
            self.table.remove(session, Removal.CLOSED)
        finally:
            hold.release()
        if self.hibernation is not None:
            self.hibernation.closed(session.id)
        log.debug("closed session %s at position %d", session.id, session.position)
        return session.position

    # Steps -------------------------------------------------------------------------------------

    def step(self, session_id: str, owner: str, step: StepInput,
             deadline: float | None = None) -> asyncio.Future[StepAnswer]:
        """Queue a step; the future holds its answer. `deadline` is a time.monotonic() instant."""
        self._accepting()
        session = self._held(session_id, owner)
        if session is None:  # the slow path: wake it from the session store first
            return asyncio.ensure_future(self._woken_step(session_id, owner, step, deadline))
        return self._submit(session, step, deadline)

    def _submit(self, session: Session, step: StepInput, deadline: float | None) -> asyncio.Future[StepAnswer]:
        answer = self.batcher.submit(session, step.tokens, step.top_k, step.temperature, step.expected_position,
                                     deadline)
        return answer if self.hibernation is None else self.hibernation.after_step(session, len(step.tokens), answer)

    async def _woken_step(self, session_id: str, owner: str, step: StepInput, deadline: float | None) -> StepAnswer:
        session = await self.find_session(session_id, owner)
        return await self._submit(session, step, deadline)

    async def generate(self, session_id: str, owner: str, request: GenerateInput,
                       send: Callable[[GeneratedToken], Awaitable[None]]) -> None:
        """Read the request's tokens if any, then generate, holding the session throughout."""
        arrived = time.perf_counter()
        self._accepting()
        session = await self.find_session(session_id, owner)
        hold = await self.batcher.hold(session)
        try:
            session.ensure_live()
            session.check_position(request.expected_position)
            if request.tokens is not None:
                await hold.submit(request.tokens)
                self._record_first_prediction(arrived)
            elif not session.has_prediction:
                raise InvalidArgument("token_ids", "the session has read nothing yet: give token_ids or text to "
                                                   "continue from")
            await continue_session(hold, self.pool, self.bundle.vocab, Sampler(request.sampling), request.max_tokens,
                                   StopStrings(request.stop), send)
        finally:
            hold.release()

    def _record_first_prediction(self, arrived: float) -> None:
        """A prompt that arrived at `arrived` (time.perf_counter()) now has its prediction."""
        if self.metrics is not None:
            self.metrics.record_first_prediction(time.perf_counter() - arrived)


def default_replica_id(settings: Settings) -> str:
    """hostname:port, the port as given in --listen: unique among replicas on one host and across hosts."""
    return f"{socket.gethostname()}:{settings.listen.rpartition(':')[2]}"
