"""The batcher: steps of many sessions, run as few model calls, each session's steps in order.

A step joins its session's line (`lines.Line`); once first in line it is checked against the
session (still there? at the expected position?) and queued. The scheduling loop takes queued
steps up to the maximum batch size, or after the maximum queue delay, and runs them as one
model call in a worker thread, so the event loop never waits on the model. Only after the
call has succeeded are the results committed: new state scattered into the pool, positions
advanced, answers set; a failed call commits nothing. A session is in a batch at most once,
because its next step is admitted only when the previous one has been committed.

Prefills of different lengths run in different calls: the queue is kept per step length and
a call takes the steps of one length, the length whose oldest step has waited longest. The
graph has no mask, so padding would feed pad tokens into the state; steps of equal length
batch exactly, and single-token steps (the hot path) are all of one length.

Each call reports a `BatchReport` to `on_batch`, the seam where metrics are recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from rnnserve.server.core.errors import RnnserveError, ServerFault
from rnnserve.server.core.prediction import Prediction, Ranker
from rnnserve.server.core.returning import Returning
from rnnserve.server.core.sessions import Session
from rnnserve.server.model.runtime import RunResult, Runtime
from rnnserve.server.model.state_pool import Row, StatePool

NEXT_LOGITS = "next_logits"  # the pool's row for the prediction after a session's last token
# How long after its answer a session still counts as on its way back (`Returning`): longer than a busy closed
# loop's round (80-90 ms at 256 unary callers on 2 cores), far shorter than a person's pause between steps.
RETURNING_HORIZON_SECONDS = 0.1

log = logging.getLogger(__name__)


class StepAnswer(NamedTuple):
    """A committed step's answer. A tuple, not a dataclass: one is made per step on the loop, and a
    frozen dataclass costs a setattr call per field."""

    position: int  # the session's position after the step
    prediction: Prediction
    unknown_characters: int = 0  # characters of the step's text read as the unknown token (engine sets it)


@dataclass(eq=False, slots=True)
class Step:
    session: Session
    tokens: np.ndarray  # [time] int64
    top_k: int
    temperature: float
    expected_position: int | None
    deadline: float | None  # time.monotonic() after which the step must not be applied
    future: asyncio.Future[StepAnswer]
    held: bool  # sent under a Hold, which owns the session's line
    queued_at: float = 0.0  # time.monotonic()


@dataclass(frozen=True, slots=True)
class BatchReport:
    """One model call, for metrics."""

    steps: int
    tokens: int  # steps x step length
    queue_wait_seconds: float  # how long the oldest step in the call waited in the queue
    run_seconds: float  # inside onnxruntime
    compute_seconds: float  # in the worker thread: gather, run, top-k
    applied: int  # steps committed; the others were cancelled or past their deadline while running
    failed: bool = False


def row_limit(max_batch_size: int, max_batch_tokens: int, length: int) -> int:
    """Steps of `length` tokens in one call: at most max_batch_size, and their tokens within max_batch_tokens."""
    return max(1, min(max_batch_size, max_batch_tokens // length))


class Batcher:
    def __init__(self, runtime: Runtime, pool: StatePool, *, max_batch_size: int, max_batch_tokens: int,
                 max_queue_delay_seconds: float, adaptive_wait_seconds: float = 0.0, adaptive_gap_seconds: float = 0.0,
                 loop_max_tokens: int = 0, on_batch: Callable[[BatchReport], None] | None = None):
        """`loop_max_tokens`: a call of at most this many tokens (steps x length), with nothing else waiting,
        runs on the event loop's own thread instead of the model thread. A lone step then skips two thread
        hand-offs (to the model thread and back, each a wake-up of a sleeping CPU), which on a virtual machine
        cost more than the step's own model time; the loop is blocked meanwhile, which is why the bound is
        small, why a second waiting step sends the call back to the model thread, and why the previous call
        must have been lone too (at 256 unary callers, lone calls between larger ones on the loop cost a fifth
        of the throughput: 1,600-1,725 against 1,826-2,149 tokens/s in alternation). 0: never."""
        self.runtime = runtime
        self.loop_max_tokens = loop_max_tokens
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_delay_seconds = max_queue_delay_seconds
        self.adaptive_wait_seconds = adaptive_wait_seconds  # see _fill_delay
        self.adaptive_gap_seconds = adaptive_gap_seconds
        self._returning = Returning(RETURNING_HORIZON_SECONDS)
        self._last_arrival = 0.0  # time.monotonic() of the latest step queued
        self._fill_target: int | None = None  # while waiting to fill a call: the queue length that ends the wait
        self._last_batch_steps = 0
        self.on_batch = on_batch
        self.state_names = [s.name for s in runtime.bundle.states]
        self._ranker = Ranker(runtime.bundle.vocab.tokens)
        self._queues: dict[int, deque[Step]] = {}  # by step length
        self._queued = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rnnserve-model")

    @staticmethod
    def pool_rows(runtime: Runtime) -> dict[str, tuple[int, ...]]:
        """The rows a session needs in the pool: its recurrent state and its next-token logits."""
        rows = {s.name: s.row_shape for s in runtime.bundle.states}
        rows[NEXT_LOGITS] = (len(runtime.bundle.vocab),)
        return rows

    @staticmethod
    def pool_dtypes(runtime: Runtime) -> dict[str, str]:
        """The storage dtype of each state row, as the graph takes it (next-token logits are float32)."""
        return {s.name: s.dtype for s in runtime.bundle.states}

    # Taking work -------------------------------------------------------------------------------

    def submit(self, session: Session, tokens: np.ndarray, top_k: int, temperature: float,
               expected_position: int | None = None, deadline: float | None = None) -> asyncio.Future[StepAnswer]:
        """Queue a step behind the session's earlier work; the future holds its answer or its error.

        Cancelling the future before the step is committed withdraws it: nothing is applied.
        """
        step = Step(session, tokens, top_k, temperature, expected_position, deadline,
                    asyncio.get_running_loop().create_future(), held=False)
        if session.line.enter(step):
            self._admit(session, step)
        return step.future

    def refuse_in_turn(self, session: Session, error: RnnserveError) -> asyncio.Future[StepAnswer]:
        """A future failing with `error`, for a step refused before it could queue, settled in the step's turn in
        the session's line (entered now, behind the work already there) with the position the session then
        stands at: what an in-band answer, given in order, must report."""
        loop = asyncio.get_running_loop()
        turn, refused = loop.create_future(), loop.create_future()

        def settle(_: asyncio.Future) -> None:
            error.session_position = session.position
            if not refused.done():
                refused.set_exception(error)
            self._leave(session)

        turn.add_done_callback(settle)
        if session.line.enter(turn):
            turn.set_result(None)
        return refused

    async def hold(self, session: Session) -> Hold:
        """Wait for the session's earlier work, then own it until `Hold.release`."""
        granted = asyncio.get_running_loop().create_future()
        if not session.line.enter(granted):
            try:
                await granted
            except asyncio.CancelledError:
                if not granted.cancelled():  # granted just as the caller gave up: pass it on
                    self._leave(session)
                raise
        return Hold(self, session)

    def _admit(self, session: Session, item: Step | asyncio.Future | None) -> None:
        """Start `item`, now first in the session's line; what finishes at once lets the next one in."""
        while item is not None and not self._start(session, item):
            item = session.line.leave()

    def _start(self, session: Session, item: Step | asyncio.Future) -> bool:
        """True when `item` now occupies the session: a step queued for the model or a hold granted."""
        if isinstance(item, asyncio.Future):
            if item.done():  # a hold its caller stopped waiting for
                return False
            item.set_result(None)
            return True
        if item.future.done():  # cancelled while it waited
            return False
        try:
            session.ensure_live()
            if item.expected_position is not None and item.expected_position != session.position:
                item.future.set_result(session.replay(item.expected_position, item.tokens))
                return False
        except RnnserveError as error:
            error.session_position = session.position
            item.future.set_exception(error)
            return False
        self._enqueue(item)
        return True

    def _enqueue(self, step: Step) -> None:
        step.queued_at = self._last_arrival = time.monotonic()
        self._returning.arrived(step.session)
        queue = self._queues.get(len(step.tokens))
        if queue is None:
            queue = self._queues[len(step.tokens)] = deque()
        queue.append(step)
        self._queued += 1
        if self._fill_target is None or self._queued >= self._fill_target:  # a wait to fill a call ends by itself
            self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _leave(self, session: Session) -> None:
        self._admit(session, session.line.leave())

    def _finish(self, step: Step) -> None:
        if not step.held:
            self._leave(step.session)

    # Scheduling --------------------------------------------------------------------------------

    async def run(self) -> None:
        """The scheduling loop: take a batch, compute it off the loop, commit it. Cancel the task to stop."""
        try:
            while True:
                batch = await self._next_batch()
                await self._run_batch(batch)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _next_batch(self) -> list[Step]:
        loop = asyncio.get_running_loop()
        while True:
            delay = None  # wait for the next step
            if self._queued:
                delay = self._fill_delay()
                if delay <= 0:
                    batch = self._take()
                    if batch:
                        return batch
                    continue
            self._wakeup = loop.create_future()
            timer = loop.call_later(delay, self._wake) if delay else None
            try:
                await self._wakeup
            finally:
                if timer:
                    timer.cancel()

    def _fill_delay(self) -> float:
        """Seconds to wait for more steps before running what is queued; sets `_fill_target` while it waits.

        With a fixed delay, the oldest step waits that long for company. With an adaptive wait, steps
        wait only while fewer are queued than sessions are on their way back (`Returning`), and only
        while they keep coming: the wait ends once no step has arrived for the adaptive gap, and at the
        latest the adaptive wait after the oldest queued step. A lone session is never on its way back
        when its step is queued, so it never waits.
        """
        self._fill_target = None
        if self._queued >= self.max_batch_size:
            return 0.0
        now = time.monotonic()
        if self.max_queue_delay_seconds:
            target, deadline = self.max_batch_size, self._oldest_queued() + self.max_queue_delay_seconds
        elif self.adaptive_wait_seconds and self._queued < (target := self._returning.count(now)):
            deadline = min(self._last_arrival + self.adaptive_gap_seconds,
                           self._oldest_queued() + self.adaptive_wait_seconds)
        else:
            return 0.0
        if deadline > now:
            self._fill_target = min(target, self.max_batch_size)
        return deadline - now

    def _oldest_queued(self) -> float:
        return min(queue[0].queued_at for queue in self._queues.values())

    def _take(self) -> list[Step]:
        """Up to a call's worth of queued steps of one length, oldest length first, skipping withdrawn ones."""
        length, queue = (next(iter(self._queues.items())) if len(self._queues) == 1 else
                         min(self._queues.items(), key=lambda item: item[1][0].queued_at))
        rows = row_limit(self.max_batch_size, self.max_batch_tokens, length)
        now = time.monotonic()
        batch = []
        while queue and len(batch) < rows:
            step = queue.popleft()
            self._queued -= 1
            if step.deadline is not None and step.deadline <= now:
                step.future.cancel()
            if step.future.done():
                self._finish(step)  # may queue the session's next step, possibly into this very batch
            else:
                batch.append(step)
        if not queue:
            del self._queues[length]
        return batch

    async def _run_batch(self, batch: list[Step]) -> None:
        # On the loop only for a lone session's traffic: a lone call right after a larger one is the first of
        # many callers coming back, whose requests the loop must read while the model runs.
        on_loop = len(batch) * len(batch[0].tokens) <= self.loop_max_tokens and self._last_batch_steps <= 1
        self._last_batch_steps = len(batch)
        slots = np.fromiter((step.session.slot for step in batch), np.intp, len(batch))
        tokens = np.concatenate([step.tokens for step in batch]).reshape(len(batch), -1)  # [batch, time]
        k = max(step.top_k for step in batch)
        temperatures = np.fromiter((step.temperature for step in batch), np.float32, len(batch))  # [batch]
        queue_wait = time.monotonic() - min(step.queued_at for step in batch)
        started = time.perf_counter()
        try:
            if on_loop and not self._queued:
                result, predictions = self._compute(slots, tokens, k, temperatures)  # a lone small call: see __init__
            else:
                result, predictions = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._compute, slots, tokens, k, temperatures)
        except Exception:
            log.exception("a model call of %d steps failed; none of them was applied", len(batch))
            self._fail(batch)
            self._report(BatchReport(len(batch), tokens.size, queue_wait, 0.0, time.perf_counter() - started, 0, True))
            return
        compute_seconds = time.perf_counter() - started
        applied = self._commit(batch, slots, result, predictions, k)
        self._report(BatchReport(len(batch), tokens.size, queue_wait, result.seconds, compute_seconds, applied))

    def _compute(self, slots: np.ndarray, tokens: np.ndarray, k: int,
                 temperatures: np.ndarray) -> tuple[RunResult, list[Prediction]]:
        """In the worker thread (or, for a lone small call, on the loop: see __init__), with each row's
        prediction made here rather than on the loop, which has every stream's messages to read and write
        meanwhile. Reading rows here is safe: rows of sessions in a running batch change only in `_commit`,
        which runs on the loop after this returns."""
        states = self.pool.gather(self.state_names, slots)  # [batch, *row_shape] each
        result = self.runtime.run(tokens, states)
        return result, self._ranker.predictions(result.next_logits, k, 1.0 / temperatures)

    def _commit(self, batch: list[Step], slots: np.ndarray, result: RunResult, predictions: list[Prediction],
                k: int) -> int:
        """Apply what ran, except steps withdrawn meanwhile; answer each step and admit its session's next."""
        now = time.monotonic()
        live = [not step.future.done() and (step.deadline is None or now < step.deadline) for step in batch]
        values = (*result.states, result.next_logits)
        if all(live):
            self.pool.scatter([*self.state_names, NEXT_LOGITS], slots, values)
        else:
            mask = np.array(live)
            self.pool.scatter([*self.state_names, NEXT_LOGITS], slots[mask], [value[mask] for value in values])
        for step, is_live, prediction in zip(batch, live, predictions):
            if is_live:
                if step.top_k < k:
                    prediction = Prediction(*(column[: step.top_k] for column in prediction))
                session = step.session
                answer = StepAnswer(session.position + len(step.tokens), prediction)
                session.advance(step.tokens, answer, now)
                if not step.held:  # a hold's next step comes from the server itself, at once
                    self._returning.answered(session, now)
                if session.history is not None:
                    session.history.record(step.tokens, self.pool, session.slot)
                step.future.set_result(answer)
            else:
                step.future.cancel()
            self._finish(step)
        return sum(live)

    def _fail(self, batch: list[Step]) -> None:
        for step in batch:
            if not step.future.done():
                fault = ServerFault("the model call failed; nothing was applied, retry the step")
                fault.session_position = step.session.position
                step.future.set_exception(fault)
            self._finish(step)

    # Outside batches -------------------------------------------------------------------------

    async def evaluate(self, tokens: np.ndarray, states: tuple[np.ndarray, ...]) -> RunResult:
        """One model call that commits nothing (scoring, peeking, replaying a rewind), on the model's thread.

        tokens [batch, time] int64, states [batch, *row_shape] each. The caller holds the sessions concerned.
        """
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self.runtime.run, tokens, states)
        except Exception:
            log.exception("a model call of %d rows outside any batch failed", len(tokens))
            raise ServerFault("the model call failed; nothing was changed, retry") from None

    def states_of(self, rows: Row | None, batch: int = 1) -> tuple[np.ndarray, ...]:
        """`rows` (None for zeros) as the model's state inputs, repeated `batch` times: [batch, *row_shape] each."""
        arrays = self.pool.arrays
        return tuple(np.zeros((batch, *arrays[name].shape[1:]), arrays[name].dtype) if rows is None else
                     np.repeat(rows[name][np.newaxis], batch, axis=0) for name in self.state_names)

    def rows_of(self, result: RunResult, row: int = 0) -> Row:
        """Row `row` of a model call's result as a session's rows: its state and next-token logits (copies)."""
        rows = {name: state[row].copy() for name, state in zip(self.state_names, result.states, strict=True)}
        rows[NEXT_LOGITS] = result.next_logits[row].copy()
        return rows

    def predict(self, next_logits: np.ndarray, top_k: int, temperature: float) -> Prediction:
        """The prediction of next-token logits [vocab] that are already at hand: no model call."""
        scale = np.array([1.0 / temperature], np.float32)
        return self._ranker.predictions(next_logits[np.newaxis], top_k, scale)[0]

    def _report(self, report: BatchReport) -> None:
        if self.on_batch is not None:
            self.on_batch(report)


class Hold:
    """Exclusive use of a session for work of several steps (a generation, a close).

    Steps sent through the hold skip the session's line, which the hold occupies; other work on
    the session waits for `release`, which itself waits for the hold's last step to settle.
    """

    def __init__(self, batcher: Batcher, session: Session):
        self._batcher = batcher
        self.session = session
        self._last: asyncio.Future[StepAnswer] | None = None

    def submit(self, tokens: np.ndarray, top_k: int = 1, temperature: float = 1.0) -> asyncio.Future[StepAnswer]:
        step = Step(self.session, tokens, top_k, temperature, None, None,
                    asyncio.get_running_loop().create_future(), held=True)
        self._batcher._enqueue(step)
        self._last = step.future
        return step.future

    def release(self) -> None:
        if self._last is None or self._last.done():
            self._batcher._leave(self.session)
        else:
            self._last.add_done_callback(lambda _: self._batcher._leave(self.session))
