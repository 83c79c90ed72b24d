"""Sessions that outlive the process: restored from the snapshot at start, saved periodically and at stop.

The session table and the state pool change only on the event loop, so a chunk of sessions
read in one turn of the loop is consistent: each record matches its rows, and a step still
running in the model is simply not in it yet. Writing happens in a thread, which asks the
loop for one chunk at a time, so a periodic snapshot of many sessions neither stalls the
loop nor holds a second copy of the pool: it costs one chunk of rows at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import numpy as np

from rnnserve.bundle import Bundle
from rnnserve.server.core.batcher import StepAnswer
from rnnserve.server.core.history import Checkpoint
from rnnserve.server.core.prediction import Prediction
from rnnserve.server.core.sessions import Session, SessionTable
from rnnserve.server.store.snapshot import (LastStep, ModelIdentity, SessionRecord, Snapshot, SnapshotHeader,
                                      SnapshotRefused, SnapshotWriter, open_snapshot, remove_leftovers)
from rnnserve.server.model.state_pool import StatePool

CHUNK_SESSIONS = 1024  # sessions read per turn of the loop: bounds both the pause and the copy being written
# A last step of more tokens (a long prompt) is not kept for exact retries across a restart: its
# retry is answered "position mismatch" with the actual position instead. This bounds a
# record's size in the file; single-token streaming steps, where retries happen, always fit.
LAST_STEP_TOKENS = 64

log = logging.getLogger(__name__)


def record_of(session: Session) -> SessionRecord:
    """What a snapshot keeps of `session`, its times as wall-clock seconds."""
    last_step = None
    if session.last_answer is not None and len(session.last_tokens) <= LAST_STEP_TOKENS:
        token_ids, probabilities, logprobs = session.last_answer.prediction
        last_step = LastStep(session.last_start, session.last_tokens.tolist(), list(token_ids), list(probabilities),
                             list(logprobs))
    return SessionRecord(session.id, session.owner, session.ttl, session.created_wall,
                         session.wall(session.last_active), session.position, last_step)


def restore_record(table: SessionTable, record: SessionRecord) -> Session:
    """The session of `record`, back in `table` (its rows are the caller's to fill)."""
    last_step = None
    if record.last_step is not None:
        step = record.last_step
        answer = StepAnswer(record.position, Prediction(step.token_ids, step.probabilities, step.logprobs))
        last_step = (step.start, np.array(step.tokens, np.int64), answer)
    return table.restore(record.id, record.owner, record.ttl, record.created, record.last_active, record.position,
                         last_step)


class Durability:
    """Snapshots of `table` and `pool` at `path`: `start` restores (and begins periodic saves), `stop` saves."""

    def __init__(self, path: Path, interval_seconds: float, table: SessionTable, pool: StatePool, bundle: Bundle):
        self.path = path
        self.interval_seconds = interval_seconds
        self.table = table
        self.pool = pool
        self.model = ModelIdentity.of(bundle)
        self.rows = {name: array.shape[1:] for name, array in sorted(pool.arrays.items())}
        self._saving = asyncio.Lock()
        self._periodic: asyncio.Task | None = None

    def start(self) -> None:
        """Restore the snapshot, if any; then save every `interval_seconds` (0: only at stop)."""
        self.restore()
        if self.interval_seconds:
            self._periodic = asyncio.create_task(self._save_periodically(), name="rnnserve-snapshots")

    async def stop(self) -> None:
        """Save once more, after a periodic save in progress (if any) has finished."""
        if self._periodic is not None:
            self._periodic.cancel()
            await asyncio.gather(self._periodic, return_exceptions=True)
        await self.save()

    # Restoring ---------------------------------------------------------------------------------

    def restore(self) -> None:
        """Load every live session of the snapshot; a refused snapshot loads nothing and is set aside, kept."""
        for leftover in remove_leftovers(self.path):
            log.warning("removed %s, left by a snapshot write that did not finish", leftover)
        if not self.path.exists():
            log.info("no snapshot at %s: starting with no sessions", self.path)
            return
        try:
            snapshot = open_snapshot(self.path, self.model, self.rows)
        except SnapshotRefused as refusal:
            kept = self.path.with_name(self.path.name + ".refused")
            os.replace(self.path, kept)  # so that this server's own snapshots do not overwrite it
            log.error("snapshot refused, no session restored: %s. Starting with no sessions; the file is kept as %s",
                      refusal, kept)
            return
        restored, expired, over_cap = self._load(snapshot)
        log.info("restored %d sessions from %s (written %s); %d had expired meanwhile, %d did not fit max_sessions "
                 "or max_sessions_per_identity",
                 restored, self.path, time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(snapshot.header.written_at)),
                 expired, over_cap)

    def _load(self, snapshot: Snapshot) -> tuple[int, int, int]:
        """Restore the snapshot's sessions that have not expired, as many as fit; counts of each."""
        now = time.time()
        restored = expired = 0
        for records, rows in snapshot.chunks():
            live = [i for i, record in enumerate(records) if record.last_active + record.ttl > now]
            expired += len(records) - len(live)
            owners = [records[i].owner for i in live]
            live = [live[k] for k in self.table.owners.admitted(owners)]  # each owner's most recently active
            live = live[: self.table.max_sessions - len(self.table)]
            sessions = [restore_record(self.table, records[i]) for i in live]
            slots = np.fromiter((session.slot for session in sessions), np.intp, len(live))
            self.pool.scatter(list(self.rows), slots, [array[live] for array in rows])
            for session in sessions:  # rewinding starts over from the state restored
                session.history = self.table.new_history(Checkpoint(session.position, self.pool.rows(session.slot)))
            restored += len(live)
        return restored, expired, snapshot.sessions - restored - expired

    # Saving ------------------------------------------------------------------------------------

    async def save(self) -> None:
        """Write every session held to the snapshot, atomically; a failure is logged and the old file kept."""
        async with self._saving:
            started = time.perf_counter()
            sessions = self.table.by_recency()
            header = SnapshotHeader(self.model, self.rows, time.time())
            try:
                written = await asyncio.to_thread(self._write, asyncio.get_running_loop(), sessions, header)
            except Exception:
                log.exception("could not write the snapshot %s; the previous one (if any) is kept", self.path)
                return
            log.info("saved %d sessions to %s in %.3f s", written, self.path, time.perf_counter() - started)

    def _write(self, loop: asyncio.AbstractEventLoop, sessions: list[Session], header: SnapshotHeader) -> int:
        """In a thread: write the file, asking the loop for each chunk of records and rows."""
        with SnapshotWriter(self.path, header) as writer:
            for start in range(0, len(sessions), CHUNK_SESSIONS):
                chunk = asyncio.run_coroutine_threadsafe(self._read_chunk(sessions[start:start + CHUNK_SESSIONS]), loop)
                writer.write_chunk(*chunk.result())
        return writer.sessions

    async def _read_chunk(self, sessions: list[Session]) -> tuple[list[SessionRecord], tuple[np.ndarray, ...]]:
        """On the loop, in one turn: the records and rows of those of `sessions` still held."""
        held = [session for session in sessions if session.removed is None]
        slots = np.fromiter((session.slot for session in held), np.intp, len(held))
        return [record_of(session) for session in held], self.pool.gather(list(self.rows), slots)

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            await asyncio.shield(self.save())  # `stop` cancels the wait, never a save half-written
