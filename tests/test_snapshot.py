"""The snapshot file: exact round trips, refusal of anything not whole or not of this model, atomic replacement."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rnnserve.server.store import snapshot
from rnnserve.server.store.snapshot import (LastStep, ModelIdentity, SessionRecord, SnapshotHeader, SnapshotRefused,
                                      SnapshotWriter, open_snapshot, remove_leftovers)

MODEL = ModelIdentity("tiny-lstm", "test", "a1" * 32)
ROWS = {"c": (2, 3), "h": (2, 3), "next_logits": (5,)}


def records(count: int, first: int = 0) -> list[SessionRecord]:
    step = LastStep(start=6, tokens=[4, 2], token_ids=[3, 1], probabilities=[0.1 + 1e-9, 0.3], logprobs=[-2.3, -1.2])
    return [SessionRecord(f"id-{i}", "owner", 60.0, 1.7e9 + i, 1.7e9 + i + 0.5, 8, step if i % 2 else None)
            for i in range(first, first + count)]


def rows(count: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    generator = np.random.default_rng(seed)
    return tuple(generator.standard_normal((count, *shape)).astype(np.float32) for shape in ROWS.values())


def write(path, chunks, model=MODEL) -> None:
    with SnapshotWriter(path, SnapshotHeader(model, ROWS, 1.7e9)) as writer:
        for chunk_records, chunk_rows in chunks:
            writer.write_chunk(chunk_records, chunk_rows)


def read(path) -> list:
    return list(open_snapshot(path, MODEL, ROWS).chunks())


def test_records_and_rows_round_trip_exactly(tmp_path):
    path = tmp_path / "sessions.snap"
    chunks = [(records(3), rows(3, seed=1)), (records(2, first=3), rows(2, seed=2))]
    write(path, chunks)
    opened = open_snapshot(path, MODEL, ROWS)
    assert opened.sessions == 5 and opened.header.model == MODEL and opened.header.rows == ROWS
    for (written_records, written_rows), (read_records, read_rows) in zip(chunks, opened.chunks(), strict=True):
        assert read_records == written_records  # floats included: JSON keeps them exactly
        for written, read_back in zip(written_rows, read_rows, strict=True):
            assert written.tobytes() == read_back.tobytes()


def test_an_empty_table_is_a_valid_snapshot(tmp_path):
    path = tmp_path / "sessions.snap"
    write(path, [])
    assert open_snapshot(path, MODEL, ROWS).sessions == 0 and read(path) == []


@pytest.mark.parametrize(("model", "rows_", "message"), [
    (ModelIdentity("tiny-lstm", "test", "b2" * 32), ROWS, "holds sessions of model tiny-lstm version test"),
    (MODEL, {**ROWS, "h": (2, 4)}, "state rows"),
])
def test_another_model_or_other_rows_are_refused(tmp_path, model, rows_, message):
    path = tmp_path / "sessions.snap"
    write(path, [(records(1), rows(1))])
    with pytest.raises(SnapshotRefused, match=message):
        open_snapshot(path, model, rows_)


def corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:]


@pytest.mark.parametrize(("damage", "message"), [
    (lambda data: data[: len(data) - 40], "truncated"),
    (lambda data: data[:30], "truncated"),
    (lambda data: b"", "truncated"),
    (corrupt, "corrupt or truncated"),
    (lambda data: b"PK\x03\x04" + data[4:], "not an rnnserve snapshot"),
    (lambda data: data[:8] + (99).to_bytes(4, "little") + data[12:], "format version 99"),
])
def test_damaged_or_unknown_files_are_refused_before_any_session_is_read(tmp_path, damage, message):
    path = tmp_path / "sessions.snap"
    write(path, [(records(4), rows(4))])
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SnapshotRefused, match=message):
        open_snapshot(path, MODEL, ROWS)


def test_a_failed_write_leaves_the_previous_snapshot_in_place(tmp_path, monkeypatch):
    path = tmp_path / "sessions.snap"
    write(path, [(records(2), rows(2))])
    before = path.read_bytes()

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write(path, [(records(3), rows(3, seed=5))])
    assert path.read_bytes() == before and read(path)[0][0] == records(2)
    assert sorted(tmp_path.iterdir()) == [path]  # the temporary file went with the error


# Killed at this point of the second write: the file holds the first snapshot, whole.
WRITE_THEN_HANG = textwrap.dedent("""
    import pathlib, sys
    from rnnserve.server.store.snapshot import SnapshotHeader, SnapshotWriter
    from test_snapshot import MODEL, ROWS, records, rows, write
    path = pathlib.Path(sys.argv[1])
    write(path, [(records(2), rows(2))])
    with SnapshotWriter(path, SnapshotHeader(MODEL, ROWS)) as writer:
        writer.write_chunk(records(500), rows(500))
        print("half written", flush=True)
        sys.stdin.read()
""")


def test_a_writer_killed_mid_write_never_leaves_a_partial_snapshot(tmp_path):
    path = tmp_path / "sessions.snap"
    writer = subprocess.Popen([sys.executable, "-c", WRITE_THEN_HANG, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)})
    try:
        assert writer.stdout.readline() == "half written\n"
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    finally:
        writer.kill()
    (chunk_records, _), = read(path)
    assert chunk_records == records(2)
    (leftover,) = remove_leftovers(path)  # the half-written temporary file, never at `path`
    assert leftover.name.startswith(".sessions.snap.") and sorted(tmp_path.iterdir()) == [path]
