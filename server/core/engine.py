"""The service's operations, free of gRPC: the servicer translates, the engine decides.

It wires the pieces on the one straight path (session table -> the session's model version:
its batcher -> its runtime, with its state pool between them) and owns their background tasks:
each version's scheduling loop, the sweep that frees expired sessions (and gives the pools'
unused rows back), and, with a snapshot path, `durability`'s restore at start, periodic saves
and the save at stop. Models come and go while it serves (`serve_model`, `retire_model`); a
session stays on the version it began with. With metrics, each version reports to its series.
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
from rnnserve.server.core.batcher import StepAnswer
from rnnserve.server.core.errors import (InvalidArgument, RnnserveError, SessionNotFound, SessionUnavailable,
                                         ShuttingDown)
from rnnserve.server.core.generate import GeneratedToken, StopStrings, continue_session
from rnnserve.server.core.models import ModelRegistry
from rnnserve.server.core.operations import Operations
from rnnserve.server.core.sampling import Sampler, SamplingParams
from rnnserve.server.core.served_model import ServedModel
from rnnserve.server.core.sessions import Removal, Session, SessionTable
from rnnserve.server.metrics import Metrics
from rnnserve.server.model.memory import release_free_memory
from rnnserve.server.settings import Settings
from rnnserve.server.store.durability import Durability

if TYPE_CHECKING:
    from rnnserve.server.store.hibernation import Hibernation

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepInput:
    tokens: np.ndarray  # [time] int64, time >= 1
    top_k: int
    temperature: float
    expected_position: int | None = None
    unknown_characters: int = 0  # characters of the request's text read as the unknown token


@dataclass(frozen=True)
class CreateInput:
    ttl_seconds: int  # 0 for the default
    prompt: StepInput | None = None
    initial_state: str = ""  # a named state to start from; "" for zeros
    session_id: str = ""  # the id a face derived for it (a Triton sequence's); "" for a new random one


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
    tokens_field: str = "token_ids"  # the request field that gave the tokens (or that an error about none names)
    unknown_characters: int = 0  # characters of the request's text read as the unknown token


class Engine:
    def __init__(self, bundles: list[tuple[Bundle, bool]], settings: Settings, metrics: Metrics | None = None):
        """Serve `bundles`, each with whether it is its model's default version; the first names the server's
        default model (a model's first version is its default until another is made so)."""
        self.settings = settings
        self.metrics = metrics
        self.table = SessionTable(max_sessions=settings.max_sessions,
                                  max_sessions_per_owner=settings.max_sessions_per_identity,
                                  evict_when_full=settings.when_full == "evict-oldest",
                                  remember_removed=settings.remember_removed, rewind_depth=settings.rewind_depth,
                                  rewind_checkpoint_every=settings.rewind_checkpoint_every)
        self.models = ModelRegistry(on_unloaded=self._unloaded)
        self.operations = Operations(self.table, self.models, self._accepting, self.find_session, self._made)
        self._started = False
        for bundle, is_default in bundles:
            self.serve_model(bundle, is_default)
        self.hibernation = self._hibernation() if settings.redis_url else None
        self.durability = (Durability(Path(settings.snapshot_path), settings.snapshot_interval_seconds, self.table,
                                      self.models) if settings.snapshot_path else None)
        self._tasks: list[asyncio.Task] = []
        self._draining = False

    # Lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        for model in self.models.all():
            model.start()
        self._started = True
        if self.durability is not None:
            self.durability.start()
        self._tasks = [asyncio.create_task(self._sweep(), name="rnnserve-sweep")]
        if self.hibernation is not None:
            self.hibernation.start()

    def _hibernation(self) -> Hibernation:
        """Sessions kept in Redis besides memory. Imported here: serving without Redis needs no Redis client."""
        from rnnserve.server.store.hibernation import Hibernation
        from rnnserve.server.store.session_store import SessionStore, replica_holder

        settings = self.settings
        store = SessionStore(settings.redis_url, replica_holder(settings.replica_id or default_replica_id(settings)),
                             lease_seconds=settings.redis_lease_seconds, timeout_seconds=settings.redis_timeout_seconds)
        return Hibernation(store, self.table, self.operations, hibernate_after_seconds=settings.hibernate_after_seconds,
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

    async def hand_off(self, grace_seconds: float) -> None:
        """With a session store, move every session there (call after `drain`): another replica continues each.
        A store that cannot be reached is tried again for up to `grace_seconds`."""
        if self.hibernation is not None:
            await self.hibernation.hand_off(grace_seconds)

    async def stop(self) -> None:
        if self.hibernation is not None:
            await self.hibernation.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(model.stop() for model in self.models.all()))
        if self.durability is not None:
            await self.durability.stop()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_seconds)
            now = time.monotonic()
            expired = self.table.expire(now)
            for model in self.models.all():
                model.cache.expire(now)
            if any([model.pool.shrink() for model in self.models.all()]):
                release_free_memory()
            if expired:
                log.info("freed %d expired sessions; %d remain", expired, len(self.table))

    @property
    def ready(self) -> bool:
        """Whether new work is taken: started and not draining."""
        return self._started and not self._draining

    def _accepting(self) -> None:
        if self._draining:
            raise ShuttingDown()

    # Models ------------------------------------------------------------------------------------

    def serve_model(self, bundle: Bundle, make_default: bool) -> ServedModel:
        """Serve `bundle` (checked already) beside the models served; new sessions of its model get it when
        `make_default` (or when it is its model's first version)."""
        model = ServedModel.load(bundle, self.settings, self.metrics)
        self.models.add(model, make_default)
        if self._started:  # at start, the serving line names every model instead
            model.start()
            log.info("loaded model %s (%s, graph sha256 %s)%s", model.describe(), bundle.cell, bundle.sha256[:12],
                     ": the default for new sessions" if self.models.is_default(model) else "")
        return model

    def retire_model(self, name: str, version: str) -> ServedModel:
        """Unload a version once its running sessions have ended (at once without any); it takes no new ones."""
        model = self.models.retire(name, version)
        if model.sessions:
            log.info("retiring model %s: it takes no new sessions and unloads once its %d running ones end",
                     model.describe(), model.sessions)
        return model

    def _unloaded(self, model: ServedModel) -> None:
        model.unloaded()
        asyncio.ensure_future(model.stop())
        log.info("unloaded model %s", model.describe())

    # Sessions ----------------------------------------------------------------------------------

    async def create_session(self, owner: str, model: ServedModel, request: CreateInput) -> Created:
        """A new session of `model`, having read the prompt if there is one; no session is left behind on failure.

        A session from zeros starts from the longest prefix of its prompt in the prefix-state cache that
        `owner` may hit and reads only the rest; a prompt read (even partly) by the model is cached for
        `owner`'s next session (for anyone's under the scope "global").
        """
        arrived = time.perf_counter()
        self._accepting()
        initial = model.states.get(owner, request.initial_state) if request.initial_state else None
        session = self.table.create(owner, request.ttl_seconds or self.settings.default_ttl_seconds, model, initial,
                                    request.session_id)
        log.debug("created session %s of model %s", session.id, model.describe())
        if request.prompt is None:
            return Created(session, None, 0)
        prompt = request.prompt
        try:
            cached = self._start_from_cache(session, prompt.tokens) if initial is None else 0
            rest = prompt.tokens[cached:]
            if len(rest):
                answer = await model.batcher.submit(session, rest, prompt.top_k, prompt.temperature)
                if initial is None:
                    model.cache.put(owner, prompt.tokens, model.pool.rows(session.slot))
            else:
                answer = StepAnswer(cached, self.operations.prediction(session, prompt.top_k, prompt.temperature))
        except BaseException:
            self.table.remove(session, Removal.CLOSED)
            raise
        self._record_first_prediction(model, arrived)
        # A derived id (a Triton sequence's) is registered before the answer: a START for the same sequence on
        # another replica meanwhile would otherwise make a second session of it.
        stored = None if self.hibernation is None else self.hibernation.created(session, wait=bool(request.session_id))
        if stored is not None:
            await stored
        return Created(session, answer, cached)

    @staticmethod
    def _start_from_cache(session: Session, prompt: np.ndarray) -> int:
        """Put the session where the longest prefix of `prompt` cached for its owner leaves it; how many tokens
        that is."""
        pool = session.model.pool
        hit = session.model.cache.longest_prefix(session.owner, prompt)
        if hit is None:
            return 0
        pool.set_rows(session.slot, hit.rows)
        if session.history is not None:
            session.history.record(hit.tokens, pool, session.slot)
        session.move_to(len(hit.tokens), time.monotonic())
        return len(hit.tokens)

    async def find_session(self, session_id: str, owner: str) -> Session:
        """The live session `session_id` of `owner`; one not held here is woken from the session store, if any."""
        session = self._held(session_id, owner)
        if session is not None:
            return session
        self._accepting()
        return await self.hibernation.wake(session_id, owner)

    async def model_of(self, session_id: str, owner: str) -> ServedModel:
        """The model version `owner`'s session runs (what reads its requests), woken from the session store if need be."""
        return (await self.find_session(session_id, owner)).model

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
            session = self.table.get(session_id, owner)
            return session.model.batcher.refuse_in_turn(session, error)
        except RnnserveError:  # no such session of this owner: nothing to wait for, no position to report
            refused = asyncio.get_running_loop().create_future()
            refused.set_exception(error)
            return refused

    async def close_session(self, session_id: str, owner: str) -> int:
        """Close after the work queued before the close; work queued after it fails NOT_FOUND. Returns the position."""
        session = await self.find_session(session_id, owner)
        hold = await session.model.batcher.hold(session)
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

    def step(self, session_id: str, owner: str, read: Callable[[ServedModel], StepInput],
             deadline: float | None = None) -> asyncio.Future[StepAnswer]:
        """Queue a step; the future holds its answer. `read` makes the step in the terms (the vocabulary) of the
        session's model; `deadline` is a time.monotonic() instant."""
        self._accepting()
        session = self._held(session_id, owner)
        if session is None:  # the slow path: wake it from the session store first
            return asyncio.ensure_future(self._woken_step(session_id, owner, read, deadline))
        return self._submit(session, read(session.model), deadline)

    def _submit(self, session: Session, step: StepInput, deadline: float | None) -> asyncio.Future[StepAnswer]:
        answer = session.model.batcher.submit(session, step.tokens, step.top_k, step.temperature,
                                              step.expected_position, deadline)
        if self.hibernation is not None:
            answer = self.hibernation.after_step(session, len(step.tokens), answer)
        if step.unknown_characters:  # rare (text outside the vocabulary): the common step pays nothing for it
            answer = asyncio.ensure_future(_counting_unknown(answer, step.unknown_characters))
        return answer

    async def _woken_step(self, session_id: str, owner: str, read: Callable[[ServedModel], StepInput],
                          deadline: float | None) -> StepAnswer:
        session = await self.find_session(session_id, owner)
        return await self._submit(session, read(session.model), deadline)

    async def generate(self, session_id: str, owner: str, read: Callable[[ServedModel], GenerateInput],
                       send: Callable[[GeneratedToken], Awaitable[None]]) -> None:
        """Read the request's tokens if any (`read` makes the request in the session's model's terms), then
        generate, holding the session throughout."""
        arrived = time.perf_counter()
        self._accepting()
        session = await self.find_session(session_id, owner)
        model = session.model
        request = read(model)
        hold = await model.batcher.hold(session)
        try:
            session.ensure_live()
            session.check_position(request.expected_position)
            if request.tokens is not None:
                await hold.submit(request.tokens)
                self._record_first_prediction(model, arrived)
            elif not session.has_prediction:
                raise InvalidArgument(request.tokens_field, "the session has read nothing yet: give token_ids or "
                                                            "text to continue from")
            await continue_session(hold, model.pool, model.bundle.vocab, Sampler(request.sampling),
                                   request.max_tokens, StopStrings(request.stop), send)
        finally:
            hold.release()

    @staticmethod
    def _record_first_prediction(model: ServedModel, arrived: float) -> None:
        """A prompt that arrived at `arrived` (time.perf_counter()) now has its prediction."""
        if model.events is not None:
            model.events.record_first_prediction(time.perf_counter() - arrived)


async def _counting_unknown(answer: asyncio.Future[StepAnswer], unknown_characters: int) -> StepAnswer:
    """`answer` saying how many of the step's characters were read as the unknown token. Awaited, so cancelling
    this withdraws the step as cancelling `answer` would; an identical retry counts them again."""
    return (await answer)._replace(unknown_characters=unknown_characters)


def default_replica_id(settings: Settings) -> str:
    """hostname:port, the port as given in --listen: unique among replicas on one host and across hosts."""
    return f"{socket.gethostname()}:{settings.listen.rpartition(':')[2]}"
