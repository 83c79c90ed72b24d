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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnserve.bundle import Bundle
from rnnserve.server.batcher import Batcher, StepAnswer
from rnnserve.server.durability import Durability
from rnnserve.server.errors import InvalidArgument, ModelNotFound, ShuttingDown
from rnnserve.server.generate import GeneratedToken, StopStrings, continue_session
from rnnserve.server.memory import release_free_memory
from rnnserve.server.metrics import Metrics
from rnnserve.server.runtime import Runtime
from rnnserve.server.sampling import Sampler, SamplingParams
from rnnserve.server.sessions import Removal, Session, SessionTable
from rnnserve.server.settings import Settings
from rnnserve.server.state_pool import StatePool

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
                                  remember_removed=settings.remember_removed, events=metrics)
        self.batcher = Batcher(runtime, self.pool, max_batch_size=settings.max_batch_size,
                               max_batch_tokens=settings.max_batch_tokens,
                               max_queue_delay_seconds=settings.max_queue_delay_us / 1e6,
                               on_batch=None if metrics is None else metrics.record_batch)
        if metrics is not None:
            metrics.watch_sessions(lambda: len(self.table), self.pool.row_bytes, settings.max_sessions)
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

    def drain(self) -> None:
        """Refuse new work (UNAVAILABLE); work already accepted goes on."""
        self._draining = True

    async def stop(self) -> None:
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

    async def create_session(self, owner: str, request: CreateInput) -> tuple[Session, StepAnswer | None]:
        """A new session, having read the prompt if there is one; no session is left behind on failure."""
        arrived = time.perf_counter()
        self._accepting()
        self.model(request.model)
        session = self.table.create(owner, request.ttl_seconds or self.settings.default_ttl_seconds)
        log.debug("created session %s", session.id)
        if request.prompt is None:
            return session, None
        prompt = request.prompt
        try:
            answer = await self.batcher.submit(session, prompt.tokens, prompt.top_k, prompt.temperature)
        except BaseException:
            self.table.remove(session, Removal.CLOSED)
            raise
        self._record_first_prediction(arrived)
        return session, answer

    def get_session(self, session_id: str, owner: str) -> Session:
        return self.table.get(session_id, owner)

    async def close_session(self, session_id: str, owner: str) -> int:
        """Close after the work queued before the close; work queued after it fails NOT_FOUND. Returns the position."""
        session = self.table.get(session_id, owner)
        hold = await self.batcher.hold(session)
        try:
            session.ensure_live()
            self.table.remove(session, Removal.CLOSED)
        finally:
            hold.release()
        log.debug("closed session %s at position %d", session.id, session.position)
        return session.position

    # Steps -------------------------------------------------------------------------------------

    def step(self, session_id: str, owner: str, step: StepInput,
             deadline: float | None = None) -> asyncio.Future[StepAnswer]:
        """Queue a step; the future holds its answer. `deadline` is a time.monotonic() instant."""
        self._accepting()
        session = self.table.get(session_id, owner)
        return self.batcher.submit(session, step.tokens, step.top_k, step.temperature, step.expected_position,
                                   deadline)

    async def generate(self, session_id: str, owner: str, request: GenerateInput,
                       send: Callable[[GeneratedToken], Awaitable[None]]) -> None:
        """Read the request's tokens if any, then generate, holding the session throughout."""
        arrived = time.perf_counter()
        self._accepting()
        session = self.table.get(session_id, owner)
        hold = await self.batcher.hold(session)
        try:
            session.ensure_live()
            session.check_position(request.expected_position)
            if request.tokens is not None:
                await hold.submit(request.tokens)
                self._record_first_prediction(arrived)
            elif session.position == 0:
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
