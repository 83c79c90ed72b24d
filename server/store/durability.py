"""Sessions that outlive the process: restored from the snapshot at start, saved periodically and at stop.

The session table and the state pool change only on the event loop, so a chunk of sessions
read in one turn of the loop is consistent: each record matches its rows, and a step still
running in the model is simply not in it yet. Writing happens in a thread, which asks the
loop for one chunk at a time, so a periodic snapshot of many sessions neither stalls the
loop nor holds a second copy of the pool: it costs one chunk of rows at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from rnnserve.server.core.batcher import StepAnswer
from rnnserve.server.core.history import Checkpoint
from rnnserve.server.core.models import ModelRegistry
from rnnserve.server.core.prediction import Prediction
from rnnserve.server.core.served_model import ServedModel
from rnnserve.server.core.sessions import Session, SessionTable
from rnnserve.server.store.snapshot import (LastStep, ModelSection, SessionRecord, Snapshot, SnapshotHeader,
                                            SnapshotRefused, SnapshotWriter, open_snapshot, remove_leftovers)

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
        prediction = session.last_answer.prediction
        last_step = LastStep(session.last_start, session.last_tokens.tolist(), list(prediction.token_ids),
                             list(prediction.probabilities), list(prediction.logprobs))
    return SessionRecord(session.id, session.owner, session.ttl, session.created_wall,
                         session.wall(session.last_active), session.position, last_step)


def restore_record(table: SessionTable, model: ServedModel, record: SessionRecord) -> Session:
    """The session of `record`, back in `table` on `model` (its rows are the caller's to fill)."""
    last_step = None
    if record.last_step is not None:
        step = record.last_step
        texts = model.bundle.vocab.tokens
        prediction = Prediction(step.token_ids, [texts[i] for i in step.token_ids], step.probabilities,
                                step.logprobs)
        last_step = (step.start, np.array(step.tokens, np.int64), StepAnswer(record.position, prediction))
    return table.restore(record.id, record.owner, record.ttl, model, record.created, record.last_active,
                         record.position, last_step)


class Durability:
    """Snapshots of `table` at `path`: `start` restores (and begins periodic saves), `stop` saves.

    A session is restored only by the model version it ran on (the same graph sha256, loaded now);
    the sessions of a version not loaded stay in a copy of the file, `<path>.unrestored`, for a
    server that loads it again.
    """

    def __init__(self, path: Path, interval_seconds: float, table: SessionTable, models: ModelRegistry):
        self.path = path
        self.interval_seconds = interval_seconds
        self.table = table
        self.models = models
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
        """Load every live session of the snapshot whose model is loaded; a refused snapshot loads nothing and is
        set aside, kept."""
        for leftover in remove_leftovers(self.path):
            log.warning("removed %s, left by a snapshot write that did not finish", leftover)
        if not self.path.exists():
            log.info("no snapshot at %s: starting with no sessions", self.path)
            return
        try:
            snapshot = open_snapshot(self.path)
            models = self._models_of(snapshot)
        except SnapshotRefused as refusal:
            self._set_aside(".refused", f"snapshot refused, no session restored: {refusal}")
            return
        if None in models:
            self._set_aside(".unrestored", "the snapshot holds sessions of model versions not loaded now ("
                            + ", ".join(section.model.describe() for section, model in
                                        zip(snapshot.header.models, models) if model is None)
                            + "): those sessions are not restored", copy=True)
        restored, expired, over_cap, skipped = self._load(snapshot, models)
        log.info("restored %d sessions from %s (written %s); %d had expired meanwhile, %d did not fit max_sessions "
                 "or max_sessions_per_identity, %d are of model versions not loaded",
                 restored, self.path, time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(snapshot.header.written_at)),
                 expired, over_cap, skipped)

    def _models_of(self, snapshot: Snapshot) -> list[ServedModel | None]:
        """The loaded version for each model of the snapshot, None where none is; SnapshotRefused when none is."""
        models = []
        for section in snapshot.header.models:
            model = self.models.with_identity(section.model)
            models.append(model if model is not None and model.shapes == section.rows else None)
        if snapshot.sessions and not any(models):
            served = ", ".join(model.identity.describe() for model in self.models.all())
            raise SnapshotRefused(f"{self.path} holds sessions of "
                                  + ", ".join(section.model.describe() for section in snapshot.header.models)
                                  + f", but this server serves {served}: their state means nothing to these models")
        return models

    def _set_aside(self, suffix: str, why: str, copy: bool = False) -> None:
        """Keep the snapshot as `<path><suffix>`, where this server's own snapshots will not overwrite it."""
        kept = self.path.with_name(self.path.name + suffix)
        (shutil.copyfile if copy else os.replace)(self.path, kept)
        log.error("%s. The file is kept as %s", why, kept)

    def _load(self, snapshot: Snapshot, models: list[ServedModel | None]) -> tuple[int, int, int, int]:
        """Restore the snapshot's sessions that have not expired and whose model is loaded, as many as fit; counts
        of each."""
        now = time.time()
        restored = expired = skipped = 0
        for index, records, rows in snapshot.chunks():
            model = models[index]
            if model is None:
                skipped += len(records)
                continue
            live = [i for i, record in enumerate(records) if record.last_active + record.ttl > now]
            expired += len(records) - len(live)
            owners = [records[i].owner for i in live]
            live = [live[k] for k in self.table.owners.admitted(owners)]  # each owner's most recently active
            live = live[: self.table.max_sessions - len(self.table)]
            sessions = [restore_record(self.table, model, records[i]) for i in live]
            slots = np.fromiter((session.slot for session in sessions), np.intp, len(live))
            names = list(snapshot.header.models[index].rows)  # the file's order of the rows
            model.pool.scatter(names, slots, [array[live] for array in rows])
            for session in sessions:  # rewinding starts over from the state restored
                session.history = self.table.new_history(Checkpoint(session.position, model.pool.rows(session.slot)))
            restored += len(live)
        return restored, expired, snapshot.sessions - restored - expired - skipped, skipped

    # Saving ------------------------------------------------------------------------------------

    async def save(self) -> None:
        """Write every session held to the snapshot, atomically; a failure is logged and the old file kept."""
        async with self._saving:
            started = time.perf_counter()
            sessions = self.table.by_recency()
            models = self.models.all()
            header = SnapshotHeader([ModelSection(model.identity, model.shapes) for model in models], time.time())
            try:
                written = await asyncio.to_thread(self._write, asyncio.get_running_loop(), sessions, models, header)
            except Exception:
                log.exception("could not write the snapshot %s; the previous one (if any) is kept", self.path)
                return
            log.info("saved %d sessions to %s in %.3f s", written, self.path, time.perf_counter() - started)

    def _write(self, loop: asyncio.AbstractEventLoop, sessions: list[Session], models: list[ServedModel],
               header: SnapshotHeader) -> int:
        """In a thread: write the file, asking the loop for each chunk of records and rows.

        Sessions go most recently active first, as restoring needs them, to within a chunk: a chunk's
        sessions are written model by model.
        """
        index = {model: i for i, model in enumerate(models)}
        with SnapshotWriter(self.path, header) as writer:
            for start in range(0, len(sessions), CHUNK_SESSIONS):
                chunk = asyncio.run_coroutine_threadsafe(self._read_chunk(sessions[start:start + CHUNK_SESSIONS]), loop)
                for model, records, rows in chunk.result():
                    writer.write_chunk(index[model], records, rows)
        return writer.sessions

    async def _read_chunk(self, sessions: list[Session]) -> list[tuple[ServedModel, list[SessionRecord],
                                                                       tuple[np.ndarray, ...]]]:
        """On the loop, in one turn: the records and rows of those of `sessions` still held, model by model."""
        held = sorted((session for session in sessions if session.removed is None), key=lambda s: id(s.model))
        parts = []
        for model, group in itertools.groupby(held, key=lambda session: session.model):
            group = list(group)
            slots = np.fromiter((session.slot for session in group), np.intp, len(group))
            rows = model.pool.gather(list(model.shapes), slots)
            parts.append((model, [record_of(session) for session in group], rows))
        return parts

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            await asyncio.shield(self.save())  # `stop` cancels the wait, never a save half-written
