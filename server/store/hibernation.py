"""Sessions between this replica's memory and the session store (Redis), for replicas behind a routing proxy.

- Wake-up: a call naming a session this replica does not hold takes it from the store (only its
  owner's, as everywhere) before anyone answers NOT_FOUND; concurrent calls share one wake-up.
- Hibernation: a sweep moves sessions idle for --hibernate-after-seconds to the store, a chunk at a
  time, each under a `Hold` so no step runs while its state is written, and frees their slots.
- Hand-off: a replica being drained moves every session it holds the same way before it exits;
  calls that arrive meanwhile are refused UNAVAILABLE with RetryInfo and land, retried, on the
  replica that routing picks next, which wakes the session there.
- Write-through: with --write-through-every n, a step whose tokens cross a multiple of n is
  answered only once the store has the session after it; writes of many sessions share a round
  trip in a background task, so the loop never waits on Redis.
- Handover on request: a replica asked for a session that another live replica holds (routing
  changed: a replica came or went, or a call came without the routing header) asks the holder
  to put it at rest, waits a moment, and takes it; the holder finishes the work queued on the
  session first. Routing by session id makes this rare: once per session whose replica changed.
- Fencing: every write is a compare-and-set on the holder (see `session_store`); a refused write,
  or a lease found lapsed, means another replica may have the session, and the copy here goes.
- Faults: with Redis unreachable or slow, sessions held keep serving, hibernation pauses, the fault
  goes to health and metrics, and a session that cannot be read whole is answered UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from rnnserve.server.core.batcher import StepAnswer
from rnnserve.server.core.errors import CapacityExhausted, RnnserveError, SessionNotFound, SessionUnavailable
from rnnserve.server.core.operations import Operations
from rnnserve.server.core.sessions import Removal, Session, SessionTable
from rnnserve.server.store.durability import record_of, restore_record
from rnnserve.server.store.session_store import Claimed, HeldElsewhere, Lost, SessionStore, StoreFault, Write
from rnnserve.server.store.snapshot import SessionRecord

CHUNK_SESSIONS = 512  # sessions moved per round trip: bounds the loop's pause and the bytes in flight
RETRY_AFTER_FAULT_SECONDS = 1.0
# After asking a holder for a session, how often and how long to look for it at rest before answering UNAVAILABLE:
# a holder answers within a few milliseconds, after the steps already queued on the session.
HANDOVER_POLL_SECONDS = 0.005
HANDOVER_POLLS = 60

log = logging.getLogger(__name__)


class StoreEvents(Protocol):
    """Where hibernation reports, as plain numbers: the metrics module implements it."""

    def record_store_up(self, up: bool) -> None: ...

    def record_store_write(self, sessions: int, seconds: float) -> None: ...

    def record_hibernated(self, sessions: int) -> None: ...


class Hibernation:
    def __init__(self, store: SessionStore, table: SessionTable, operations: Operations, *,
                 hibernate_after_seconds: float, write_through_every: int, sweep_seconds: float,
                 events: StoreEvents | None = None, on_health: Callable[[bool], None] | None = None):
        self.store = store
        self.table = table
        self.operations = operations
        self.hibernate_after_seconds = hibernate_after_seconds
        self.write_through_every = write_through_every
        self.sweep_seconds = sweep_seconds
        self.events = events
        self.on_health = on_health
        self.healthy = True
        self._waking: dict[str, asyncio.Future[None]] = {}
        # Writes waiting for the writer task, newest per session, with the futures to settle once written.
        self._pending: dict[str, tuple[Session, Write, list[tuple[asyncio.Future, object]]]] = {}
        self._forgets: list[str] = []
        self._work = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # Lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep_lease(), name="rnnserve-store-lease"),
                       asyncio.create_task(self._write_loop(), name="rnnserve-store-writer"),
                       asyncio.create_task(self._answer_release_requests(), name="rnnserve-store-handover")]
        if self.hibernate_after_seconds:
            self._tasks.append(asyncio.create_task(self._sweep(), name="rnnserve-hibernation"))
        if self.events is not None:
            self.events.record_store_up(self.healthy)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()

    # Faults ------------------------------------------------------------------------------------

    def _fault(self, fault: StoreFault) -> None:
        if self.healthy:
            log.warning("the session store cannot be reached (%s): sessions held keep serving, hibernation pauses",
                        fault)
        self._set_health(False)

    def _set_health(self, healthy: bool) -> None:
        if healthy == self.healthy:
            return
        if healthy:
            log.info("the session store is reachable again")
        self.healthy = healthy
        if self.on_health is not None:
            self.on_health(healthy)
        if self.events is not None:
            self.events.record_store_up(healthy)

    # Wake-up -----------------------------------------------------------------------------------

    async def wake(self, session_id: str, owner: str) -> Session:
        """The session taken from the store into this replica; one wake-up per session however many calls wait."""
        waking = self._waking.get(session_id)
        if waking is None:
            waking = self._waking[session_id] = asyncio.ensure_future(self._wake(session_id, owner))
            waking.add_done_callback(lambda _: self._waking.pop(session_id, None))
        await asyncio.shield(waking)
        return self.table.get(session_id, owner)  # the owner checked again: a shared wake-up may be another's

    async def _wake(self, session_id: str, owner: str) -> None:
        if not self.healthy:
            raise SessionUnavailable(session_id, "may be in the session store, which cannot be reached now",
                                     RETRY_AFTER_FAULT_SECONDS)
        try:
            claim = await self.store.claim(session_id, owner)
            if isinstance(claim, HeldElsewhere):
                claim = await self._ask_for(session_id, owner, claim.holder)
        except StoreFault as fault:
            self._fault(fault)
            raise SessionUnavailable(session_id, "cannot be read from the session store now",
                                     RETRY_AFTER_FAULT_SECONDS) from None
        if claim is None:
            raise SessionNotFound(session_id)
        if isinstance(claim, HeldElsewhere):
            raise SessionUnavailable(session_id, f"is live on replica {claim.holder}, which has not let it go",
                                     RETRY_AFTER_FAULT_SECONDS)
        if isinstance(claim, Lost):
            raise SessionNotFound(session_id, "was lost with the replica that held it (it had stored no state)")
        await self._install(session_id, claim)

    async def _ask_for(self, session_id: str, owner: str, holder: str) -> Claimed | HeldElsewhere | Lost | None:
        """Ask the holder to put the session at rest, then claim it; still HeldElsewhere if it did not in time."""
        if not await self.store.ask_release(holder, session_id):
            return HeldElsewhere(holder)  # no one listens: a replica that died, whose lease has not lapsed yet
        for _ in range(HANDOVER_POLLS):
            await asyncio.sleep(HANDOVER_POLL_SECONDS)
            claim = await self.store.claim(session_id, owner)
            if not isinstance(claim, HeldElsewhere):
                return claim
        return claim

    async def _answer_release_requests(self) -> None:
        """Put at rest each session another replica asks for; listen again after a fault."""
        while True:
            try:
                async for session_id in self.store.release_requests():
                    session = self.table.held(session_id)
                    if session is not None and session.removed is None:
                        await self.put_at_rest([session])
            except StoreFault as fault:
                self._fault(fault)
                await asyncio.sleep(RETRY_AFTER_FAULT_SECONDS)

    async def _install(self, session_id: str, claim: Claimed) -> None:
        """Admit the claimed session whole, or give the claim back and refuse: never a partial or zeroed state."""
        try:
            model, portable = self.operations.decode(claim.state)
            record = SessionRecord.from_json(json.loads(claim.record))
            if record.position != portable.position:
                raise ValueError(f"record at {record.position}, state at {portable.position}")
        except (RnnserveError, ValueError, TypeError, KeyError) as refusal:
            log.error("session %s in the session store cannot be read whole: %s", session_id, refusal)
            await self._give_back(session_id)
            raise SessionUnavailable(session_id, "has a stored state this replica cannot read whole",
                                     RETRY_AFTER_FAULT_SECONDS) from None
        try:
            session = restore_record(self.table, model, record)
        except CapacityExhausted:
            await self._give_back(session_id)
            raise
        self.operations.install(session, portable)
        session.touch(time.monotonic())  # a call named it: it is active, not a candidate to hibernate again

    async def _give_back(self, session_id: str) -> None:
        try:
            await self.store.release(session_id)
        except StoreFault as fault:
            self._fault(fault)  # the claim lapses with this replica's lease at the latest

    # Hibernation and hand-off ------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_seconds)
            if not self.healthy:
                continue  # paused: the sessions stay here, serving, until the store is back
            cutoff = time.monotonic() - self.hibernate_after_seconds
            while idle := self.table.idle(cutoff, CHUNK_SESSIONS):
                try:
                    await self.put_at_rest(idle)
                except StoreFault as fault:
                    self._fault(fault)
                    break

    async def hand_off(self) -> None:
        """Move every session held to the store: the drain of a replica that is stopping."""
        started, moved = time.perf_counter(), 0
        held = self.table.by_recency()  # no session joins: a draining engine neither creates nor wakes any
        for start in range(0, len(held), CHUNK_SESSIONS):
            try:
                moved += await self.put_at_rest(held[start:start + CHUNK_SESSIONS])
            except StoreFault as fault:
                self._fault(fault)
                log.error("could not hand %d sessions to the session store: they end with this replica",
                          len(self.table))
                return
        log.info("handed %d sessions to the session store in %.3f s", moved, time.perf_counter() - started)

    async def put_at_rest(self, sessions: list[Session]) -> int:
        """Put `sessions` at rest in the store and free them here; how many were written."""
        holds = [await session.model.batcher.hold(session) for session in sessions]  # free ones are granted at once
        try:
            live = [session for session in sessions if session.removed is None]
            started = time.perf_counter()
            written = await self.store.write([self._write_of(session, release=True) for session in live])
            self._record_write(len(live), started)
            for session in live:  # written, or held elsewhere now: this copy is stale either way
                self.table.remove(session, Removal.MOVED)
        finally:
            for hold in holds:
                hold.release()
        if self.events is not None:
            self.events.record_hibernated(sum(written))
        return sum(written)

    def _write_of(self, session: Session, release: bool, state: bool = True) -> Write:
        record = json.dumps(dataclasses.asdict(record_of(session)), separators=(",", ":")).encode()
        milliseconds = int((session.expires - time.monotonic()) * 1000)
        return Write(session.id, session.owner, record, self.operations.blob_of(session) if state else b"",
                     milliseconds, release)

    def _record_write(self, sessions: int, started: float) -> None:
        self._set_health(True)
        if self.events is not None:
            self.events.record_store_write(sessions, time.perf_counter() - started)

    # Write-through and registration ------------------------------------------------------------

    def created(self, session: Session, wait: bool = False) -> asyncio.Future[None] | None:
        """Register a new session, so that no other replica takes its id while it lives here; with write-through,
        its state too. With write-through or `wait` (a session whose id a face derived, which another replica could
        be asked to create too), the future settles once stored, failing if another replica holds the id. Skipped
        while the store is at fault: serving goes on."""
        if not self.healthy:
            return None
        if self.write_through_every or wait:
            done = asyncio.get_running_loop().create_future()
            self._queue(session, bool(self.write_through_every), (done, None))
            return done
        self._queue(session, False)
        return None

    def after_step(self, session: Session, tokens: int, answer: asyncio.Future[StepAnswer]) -> asyncio.Future:
        """The step's answer, held back until the store has the session when the step crosses a write-through mark
        (not while the store is at fault: then the step is answered at once, and the session stored when it next
        crosses a mark with the store back)."""
        if not self.write_through_every:
            return answer
        every = self.write_through_every
        stored = asyncio.get_running_loop().create_future()

        def on_answer(future: asyncio.Future[StepAnswer]) -> None:
            if stored.done():
                return
            if future.cancelled():
                stored.cancel()
            elif future.exception() is not None:
                stored.set_exception(future.exception())
            elif self.healthy and session.removed is None and future.result().position // every != (
                    future.result().position - tokens) // every:
                self._queue(session, True, (stored, future.result()))
            else:
                stored.set_result(future.result())

        answer.add_done_callback(on_answer)
        stored.add_done_callback(lambda _: answer.cancel() if stored.cancelled() else None)  # withdraws the step
        return stored

    def closed(self, session_id: str) -> None:
        self._forgets.append(session_id)
        self._work.set()

    def _queue(self, session: Session, state: bool, waiter: tuple[asyncio.Future, object] | None = None) -> None:
        pending = self._pending.get(session.id)
        waiters = [] if pending is None else pending[2]
        if waiter is not None:
            waiters.append(waiter)
        self._pending[session.id] = session, self._write_of(session, False, state), waiters
        self._work.set()

    async def _write_loop(self) -> None:
        """Write what is pending in one round trip, then what gathered meanwhile; waiters settle either way."""
        while True:
            await self._work.wait()
            self._work.clear()
            pending, self._pending = self._pending, {}
            forgets, self._forgets = self._forgets, []
            started = time.perf_counter()
            try:
                for session_id in forgets:
                    await self.store.forget(session_id)
                written = await self.store.write([write for _, write, _ in pending.values()]) if pending else []
                self._record_write(len(pending), started)
            except StoreFault as fault:
                self._fault(fault)  # answered all the same: serving goes on without the store
                written = [True] * len(pending)
            for (session, _, waiters), ok in zip(pending.values(), written):
                for future, value in waiters:
                    if future.done():
                        continue
                    if ok or session.removed is not None:  # stored, or stored since by its move, or closed
                        future.set_result(value)
                    else:  # the step ran on a stale copy: refused, so that its retry reaches the session's holder
                        future.set_exception(SessionUnavailable(session.id, "is held by another replica now"))
                if not ok:
                    await self._drop([session], "another replica holds it now")

    # The lease ---------------------------------------------------------------------------------

    async def _keep_lease(self) -> None:
        """Renew the lease every third of its length; after a lapse, drop the sessions others may have taken."""
        renewed_before = False
        while True:
            try:
                if not await self.store.renew_lease() and renewed_before:
                    await self._check_ownership()
                renewed_before = True
                self._set_health(True)
            except StoreFault as fault:
                self._fault(fault)
            await asyncio.sleep(self.store.lease_ms / 3000)

    async def _check_ownership(self) -> None:
        held = self.table.by_recency()
        log.warning("this replica's lease lapsed: checking which of its %d sessions are still its own", len(held))
        for start in range(0, len(held), CHUNK_SESSIONS):
            chunk = held[start:start + CHUNK_SESSIONS]
            mine = await self.store.still_held([session.id for session in chunk])
            await self._drop([session for session, ok in zip(chunk, mine) if not ok], "taken while the lease lapsed")

    async def _drop(self, sessions: list[Session], why: str) -> None:
        """Free stale copies: their next call wakes the session from where it is now, or is refused."""
        for session in sessions:
            hold = await session.model.batcher.hold(session)
            try:
                if session.removed is None:
                    log.warning("dropped session %s here: %s", session.id, why)
                    self.table.remove(session, Removal.MOVED)
            finally:
                hold.release()
