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
- The store's return: when the store answers again after a fault, or is found to be another life of
  Redis (restarted, perhaps empty), every live session is written again at once, so the kill -9 bound
  holds from then on; and the sessions this replica put at rest that the store lost are marked there
  (tombstones) and here, so that their ids are answered SESSION_LOST with what is known, never as unknown.
- A drain retries handing over until its grace period ends, so a Redis outage shorter than that loses
  nothing; what could not be handed over is counted in the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple, Protocol

from rnnserve.server.core.batcher import StepAnswer
from rnnserve.server.core.errors import (CapacityExhausted, RnnserveError, SessionLost, SessionNotFound,
                                         SessionUnavailable)
from rnnserve.server.core.operations import Operations
from rnnserve.server.core.sessions import Removal, Session, SessionTable
from rnnserve.server.store.durability import record_of, restore_record
from rnnserve.server.store.session_store import (Claimed, HeldElsewhere, Lost, SessionStore, StoreFault, Tombstone,
                                                 Write)
from rnnserve.server.store.snapshot import SessionRecord

CHUNK_SESSIONS = 512  # sessions moved per round trip: bounds the loop's pause and the bytes in flight
RETRY_AFTER_FAULT_SECONDS = 1.0
# After asking a holder for a session, how often and how long to look for it at rest before answering UNAVAILABLE:
# a holder answers within a few milliseconds, after the steps already queued on the session.
HANDOVER_POLL_SECONDS = 0.005
HANDOVER_POLLS = 60
LEASE_MARGIN_SECONDS = 0.25  # added to a dead holder's lease left: its key's expiry is Redis's, not ours, to time
RETRY_HAND_OFF_SECONDS = 0.25  # how often a drain tries the store again while it cannot be reached

log = logging.getLogger(__name__)


class AtRest(NamedTuple):
    """What this replica knows of a session it put at rest: enough to tell its loss from an unknown id."""

    owner: str
    position: int
    expires: float  # time.time() when it expires: no longer worth a word after that
    incarnation: str  # of the store it was last known to hold it in; "" once lost


def lost_error(session_id: str, claim: Lost) -> SessionLost:
    """What a caller is told of a session the store has only a trace of: a tombstone, or a registration whose
    replica died before storing its state."""
    if claim.lost:
        note = json.loads(claim.lost)
        return SessionLost(session_id, "the session store restarted without it after it was put at rest there",
                           note.get("replica", ""), note.get("position"))
    position = SessionRecord.from_json(json.loads(claim.record)).position if claim.record else None
    return SessionLost(session_id, "the replica that held it stopped before storing its state", claim.holder,
                       position)


class StoreEvents(Protocol):
    """Where hibernation reports, as plain numbers: the metrics module implements it."""

    def record_store_up(self, up: bool) -> None: ...

    def record_store_write(self, sessions: int, seconds: float) -> None: ...

    def record_hibernated(self, sessions: int) -> None: ...

    def record_sessions_lost(self, sessions: int) -> None: ...


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
        # Sessions put at rest from here, oldest first: told SESSION_LOST if the store comes back without them.
        self._at_rest: OrderedDict[str, AtRest] = OrderedDict()
        self.incarnation = ""  # of the store, as last seen; "" until first seen
        # Live sessions whose registration or write-through the store missed while at fault: written once it is back.
        self._unstored: set[Session] = set()

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
                claim = await self._ask_for(session_id, owner, claim)
        except StoreFault as fault:
            self._fault(fault)
            raise SessionUnavailable(session_id, "cannot be read from the session store now",
                                     RETRY_AFTER_FAULT_SECONDS) from None
        if claim is None:
            raise self._unknown(session_id, owner)
        if isinstance(claim, HeldElsewhere):
            raise SessionUnavailable(session_id, f"is live on replica {claim.holder}, which has not let it go",
                                     max(RETRY_AFTER_FAULT_SECONDS, claim.lease_ms / 1000 + LEASE_MARGIN_SECONDS))
        if isinstance(claim, Lost):
            raise lost_error(session_id, claim)
        self._at_rest.pop(session_id, None)
        await self._install(session_id, claim)

    def _unknown(self, session_id: str, owner: str) -> SessionNotFound:
        """Not in the store: lost, if this replica put it there in a life of the store that is over; else unknown."""
        at_rest = self._at_rest.get(session_id)
        if at_rest is None or at_rest.owner != owner or at_rest.expires < time.time() or (
                at_rest.incarnation == self.incarnation):
            return SessionNotFound(session_id)
        return SessionLost(session_id, "the session store restarted without it after it was put at rest there",
                           self.store.holder, at_rest.position)

    async def _ask_for(self, session_id: str, owner: str, held: HeldElsewhere) -> Claimed | HeldElsewhere | Lost | None:
        """Ask the holder to put the session at rest, then claim it; still HeldElsewhere if it did not in time."""
        if not await self.store.ask_release(held.holder, session_id):
            return held  # no one listens: a replica that died, whose lease has not lapsed yet
        for _ in range(HANDOVER_POLLS):
            await asyncio.sleep(HANDOVER_POLL_SECONDS)
            claim = await self.store.claim(session_id, owner)
            if not isinstance(claim, HeldElsewhere):
                return claim
        return HeldElsewhere(held.holder, 0)  # it listens, so it lives: busy, not dead; soon is worth a retry

    async def _answer_release_requests(self) -> None:
        """Put at rest each session another replica asks for; listen again after a fault. One the store still names
        this replica the holder of, though it holds it no more (a store that lost the write that put it at rest, and
        kept an older copy), is put at rest as stored: rolled back, never stuck with a holder that lets nothing go."""
        while True:
            try:
                async for session_id in self.store.release_requests():
                    session = self.table.held(session_id)
                    if session is not None and session.removed is None:
                        await self.put_at_rest([session])
                    elif session_id not in self._waking:
                        await self.store.release(session_id)
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
            self._forget_expired()
            if not self.healthy:
                continue  # paused: the sessions stay here, serving, until the store is back
            cutoff = time.monotonic() - self.hibernate_after_seconds
            while idle := self.table.idle(cutoff, CHUNK_SESSIONS):
                try:
                    await self.put_at_rest(idle)
                except StoreFault as fault:
                    self._fault(fault)
                    break

    async def hand_off(self, grace_seconds: float) -> None:
        """Move every session held to the store: the drain of a replica that is stopping. While the store cannot be
        reached, try again until `grace_seconds` have passed; what is left then ends with this replica."""
        started, moved = time.monotonic(), 0
        deadline = started + grace_seconds
        held = self.table.by_recency()  # no session joins: a draining engine neither creates nor wakes any
        while held:
            try:
                moved += await self.put_at_rest(held[:CHUNK_SESSIONS])
                held = held[CHUNK_SESSIONS:]
            except StoreFault as fault:
                self._fault(fault)
                if time.monotonic() + RETRY_HAND_OFF_SECONDS > deadline:
                    break
                await asyncio.sleep(RETRY_HAND_OFF_SECONDS)
        left = sum(1 for session in held if session.removed is None)
        (log.error if left else log.info)(
            "handed %d sessions to the session store in %.3f s; %d could not be handed over%s", moved,
            time.monotonic() - started, left, " (the store could not be reached within --grace-seconds): they end "
            "with this replica, at their last write-through if any" if left else "")

    async def put_at_rest(self, sessions: list[Session]) -> int:
        """Put `sessions` at rest in the store and free them here; how many were written."""
        holds = [await session.model.batcher.hold(session) for session in sessions]  # free ones are granted at once
        try:
            live = [session for session in sessions if session.removed is None]
            started = time.perf_counter()
            writes = [self._write_of(session, release=True) for session in live]
            written = await self.store.write(writes)
            self._record_write(len(live), started)
            now = time.time()
            for session, write, ok in zip(live, writes, written):  # written, or held elsewhere now: stale either way
                self.table.remove(session, Removal.MOVED)
                if ok:
                    self._at_rest[session.id] = AtRest(session.owner, session.position,
                                                       now + write.milliseconds / 1000, self.incarnation)
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
        while the store is at fault (serving goes on), and written once it is back."""
        if not self.healthy:
            self._unstored.add(session)
            return None
        if self.write_through_every or wait:
            done = asyncio.get_running_loop().create_future()
            self._queue(session, bool(self.write_through_every), (done, None))
            return done
        self._queue(session, False)
        return None

    def after_step(self, session: Session, tokens: int, answer: asyncio.Future[StepAnswer]) -> asyncio.Future:
        """The step's answer, held back until the store has the session when the step crosses a write-through mark
        (not while the store is at fault: then the step is answered at once, and the session stored as soon as the
        store is back)."""
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
            elif session.removed is None and future.result().position // every != (
                    future.result().position - tokens) // every:
                if self.healthy:
                    self._queue(session, True, (stored, future.result()))
                else:
                    self._unstored.add(session)
                    stored.set_result(future.result())
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
                self._unstored.update(session for session, _, _ in pending.values())
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
        """Renew the lease every third of its length; after a lapse, drop the sessions others may have taken; when
        the store is back after a fault, or is another life of Redis, write again what it should have."""
        renewed_before = False
        while True:
            try:
                if not await self.store.renew_lease() and renewed_before:
                    await self._check_ownership()
                renewed_before = True
                incarnation = await self.store.incarnation()
                if not self.incarnation:
                    await self._report_persistence()
                restarted = bool(self.incarnation) and incarnation != self.incarnation
                if restarted or self._unstored:
                    await self._store_returned(restarted, incarnation)
                self.incarnation = incarnation
                self._set_health(True)
            except StoreFault as fault:
                self._fault(fault)
            await asyncio.sleep(self.store.lease_ms / 3000)

    async def _report_persistence(self) -> None:
        """Say at start what a restart of the store would cost: a warning when it would lose everything."""
        persistence = await self.store.persistence()
        if persistence is None:
            log.info("the session store refuses CONFIG, so whether it keeps sessions across its own restart is "
                     "unknown; see docs/OPERATIONS.md for the loss bound of each Redis setting")
        elif persistence.keeps_nothing:
            log.warning("the session store persists nothing (appendonly no, save \"\"): a Redis restart loses every "
                        "session at rest there, and live sessions' write-through copies; run it with appendonly yes "
                        "(docs/OPERATIONS.md)")
        else:
            log.info("the session store persists sessions: %s (docs/OPERATIONS.md gives the loss bound of each)",
                     f"appendonly yes, appendfsync {persistence.appendfsync}" if persistence.appendonly
                     else f"RDB snapshots only (save {persistence.save!r})")

    async def _store_returned(self, restarted: bool, incarnation: str) -> None:
        """Write at once (its state with write-through, else its registration) every live session of a store
        restarted, or those the store missed while at fault; in a store restarted, also mark as lost the sessions
        this replica put at rest that it no longer has."""
        missed, self._unstored = self._unstored, set()  # a fault while writing them puts them back
        held = [session for session in (self.table.by_recency() if restarted else missed) if session.removed is None]
        for start in range(0, len(held), CHUNK_SESSIONS):
            for session in held[start:start + CHUNK_SESSIONS]:
                self._queue(session, bool(self.write_through_every))
            await asyncio.sleep(0)  # a chunk per turn of the loop: steps go on meanwhile
        buried = await self._bury_missing(incarnation) if restarted else 0
        if self.events is not None:
            self.events.record_sessions_lost(buried)
        log.warning("the session store is back%s: writing %d live sessions here at once%s",
                    " as another life of Redis (restarted)" if restarted else " after a fault", len(held),
                    f"; {buried} sessions put at rest from here were missing from it and are now answered "
                    "SESSION_LOST" if restarted else "")

    async def _bury_missing(self, incarnation: str) -> int:
        """Write a tombstone for each session put at rest from here that the store's new life lacks; how many."""
        self._forget_expired()
        now, buried = time.time(), 0
        at_rest = list(self._at_rest.items())
        for start in range(0, len(at_rest), CHUNK_SESSIONS):
            chunk = at_rest[start:start + CHUNK_SESSIONS]
            stones = [Tombstone(session_id, kept.owner, json.dumps({"replica": self.store.holder,
                                                                    "position": kept.position}).encode(),
                                int((kept.expires - now) * 1000)) for session_id, kept in chunk]
            for (session_id, kept), lost in zip(chunk, await self.store.bury(stones)):
                if self._at_rest.get(session_id) is kept:  # not woken meanwhile
                    # A survivor is known to be in this life of the store; a lost one in none ("").
                    self._at_rest[session_id] = kept._replace(incarnation="" if lost else incarnation)
                buried += lost
        return buried

    def _forget_expired(self) -> None:
        """Drop the record of sessions at rest that have expired by now (oldest first: most expire in that order)."""
        now = time.time()
        while self._at_rest and next(iter(self._at_rest.values())).expires < now:
            self._at_rest.popitem(last=False)

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
