"""The snapshot file: exact round trips (several models' sessions in one file, and the single-model files of format
version 1), refusal of anything not whole, atomic replacement. Which model may restore which sessions is
durability's to decide: tests/test_durability.py."""

import os
import signal
import subprocess
import sys
import textwrap

import dataclasses
import hashlib
import json
import struct

import numpy as np
import pytest

from rnnserve.server.store import snapshot
from rnnserve.server.store.snapshot import (LastStep, ModelIdentity, ModelSection, SessionRecord, SnapshotHeader,
                                            SnapshotRefused, SnapshotWriter, open_snapshot, remove_leftovers)

MODEL = ModelIdentity("tiny-lstm", "test", "a1" * 32)
ROWS = {"c": (2, 3), "h": (2, 3), "next_logits": (5,)}
OTHER = ModelSection(ModelIdentity("tiny-gru", "2", "b2" * 32), {"h": (1, 4), "next_logits": (5,)})


def records(count: int, first: int = 0) -> list[SessionRecord]:
    step = LastStep(start=6, tokens=[4, 2], token_ids=[3, 1], probabilities=[0.1 + 1e-9, 0.3], logprobs=[-2.3, -1.2])
    return [SessionRecord(f"id-{i}", "owner", 60.0, 1.7e9 + i, 1.7e9 + i + 0.5, 8, step if i % 2 else None)
            for i in range(first, first + count)]


def rows(count: int, seed: int = 0, shapes=ROWS) -> tuple[np.ndarray, ...]:
    generator = np.random.default_rng(seed)
    return tuple(generator.standard_normal((count, *shape)).astype(np.float32) for shape in shapes.values())


def write(path, chunks, sections=(ModelSection(MODEL, ROWS),)) -> None:
    """Chunks of (records, rows) of the first model, or (model index, records, rows)."""
    with SnapshotWriter(path, SnapshotHeader(list(sections), 1.7e9)) as writer:
        for chunk in chunks:
            writer.write_chunk(*((0, *chunk) if len(chunk) == 2 else chunk))


def read(path) -> list:
    """The chunks of the file as (records, rows), each of the first model."""
    return [(chunk_records, chunk_rows) for _, chunk_records, chunk_rows in open_snapshot(path).chunks()]


def test_records_and_rows_of_several_models_round_trip_exactly(tmp_path):
    path = tmp_path / "sessions.snap"
    chunks = [(0, records(3), rows(3, seed=1)), (1, records(1, first=7), rows(1, seed=3, shapes=OTHER.rows)),
              (0, records(2, first=3), rows(2, seed=2))]
    write(path, chunks, (ModelSection(MODEL, ROWS), OTHER))
    opened = open_snapshot(path)
    assert opened.sessions == 6 and opened.header.models == [ModelSection(MODEL, ROWS), OTHER]
    for written, (index, read_records, read_rows) in zip(chunks, opened.chunks(), strict=True):
        assert (index, read_records) == written[:2]  # floats included: JSON keeps them exactly
        for written_rows, read_back in zip(written[2], read_rows, strict=True):
            assert written_rows.tobytes() == read_back.tobytes()


def test_a_format_1_file_of_one_model_is_read_as_that_model_s_section(tmp_path):
    """Servers of one model wrote format 1: a restart onto this version must not lose their sessions."""
    path = tmp_path / "sessions.snap"
    written_records, written_rows = records(2), rows(2, seed=4)
    header = json.dumps({"model": {"name": MODEL.name, "version": MODEL.version, "sha256": MODEL.sha256},
                         "rows": ROWS, "written_at": 1.7e9}).encode()
    chunk = json.dumps([record_json(record) for record in written_records]).encode()
    body = (snapshot.MAGIC + struct.pack("<I", 1) + struct.pack("<I", len(header)) + header
            + struct.pack("<I", len(chunk)) + chunk + b"".join(array.tobytes() for array in written_rows)
            + struct.pack("<I", 0) + struct.pack("<Q", 2))
    path.write_bytes(body + hashlib.sha256(body).digest())
    opened = open_snapshot(path)
    assert opened.version == 1 and opened.header.models == [ModelSection(MODEL, ROWS)]
    [(index, read_records, read_rows)] = opened.chunks()
    assert index == 0 and read_records == written_records
    assert [array.tobytes() for array in read_rows] == [array.tobytes() for array in written_rows]


def record_json(record: SessionRecord) -> dict:
    return dataclasses.asdict(record)


def test_an_empty_table_is_a_valid_snapshot(tmp_path):
    path = tmp_path / "sessions.snap"
    write(path, [])
    assert open_snapshot(path).sessions == 0 and read(path) == []


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
        open_snapshot(path)


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
    from rnnserve.server.store.snapshot import ModelSection, SnapshotHeader, SnapshotWriter
    from test_snapshot import MODEL, ROWS, records, rows, write
    path = pathlib.Path(sys.argv[1])
    write(path, [(records(2), rows(2))])
    with SnapshotWriter(path, SnapshotHeader([ModelSection(MODEL, ROWS)])) as writer:
        writer.write_chunk(0, records(500), rows(500))
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
