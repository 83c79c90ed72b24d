"""The snapshot file: every session's record and state rows, written atomically, each session read back only by
the model version it ran on.

A snapshot is what survives a restart, so it is written so that no crash can leave half of one
in place (a temporary file in the same directory, fsync, rename, fsync of the directory) and
read so that nothing is loaded from a file that is not whole (the trailer's sha256 covers every
byte), and no session by a model other than its own (the header names each model's graph sha256).

Layout, little-endian, format version 2:

    magic b"RNNSNAP\\0", u32 format version
    u32 n, n bytes of header JSON: {"models": [{"model": {"name", "version", "sha256"},
                                                "rows": {name: row shape}}, ...],
                                    "written_at": unix seconds}
    chunks, each: u32 n (> 0), n bytes of JSON: {"model": index into models, "sessions": a list of
                  session records (`SessionRecord`)}; then for each of that model's row arrays, in
                  header order, the chunk's rows [sessions, *row_shape] float32 as raw bytes
                  (numpy arrays written in bulk, never float by float)
    trailer: u32 0, u64 sessions, the 32-byte sha256 of every byte before the digest

Version 1, written before servers held several models, is read too: its header is one model's
{"model", "rows"} and its chunks are bare lists of records. Records carry wall-clock times,
which survive a restart (monotonic clocks do not).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np

from rnnserve.bundle import Bundle

MAGIC = b"RNNSNAP\0"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_DIGEST_BYTES = hashlib.sha256().digest_size
_ROW_DTYPE = np.dtype("<f4")


class SnapshotRefused(ValueError):
    """A snapshot that must not be loaded; the message says why (another model, corrupt, unknown format)."""


@dataclass(frozen=True)
class ModelIdentity:
    """What a snapshot belongs to: its state only means something to the graph with this sha256."""

    name: str
    version: str
    sha256: str

    @staticmethod
    def of(bundle: Bundle) -> ModelIdentity:
        return ModelIdentity(bundle.name, bundle.version, bundle.sha256)

    def describe(self) -> str:
        return f"model {self.name} version {self.version} (graph sha256 {self.sha256[:12]})"


@dataclass(frozen=True)
class LastStep:
    """A session's last step and its answer, so that an exact retry after a restart is still answered once."""

    start: int  # the position the step started at
    tokens: list[int]
    token_ids: list[int]
    probabilities: list[float]  # JSON keeps every float exactly (repr round-trips)
    logprobs: list[float]


@dataclass(frozen=True)
class SessionRecord:
    id: str
    owner: str
    ttl: float  # idle seconds before it expires
    created: float  # unix seconds
    last_active: float  # unix seconds
    position: int
    last_step: LastStep | None = None

    @staticmethod
    def from_json(entry: dict) -> SessionRecord:
        last_step = entry.pop("last_step")
        return SessionRecord(**entry, last_step=None if last_step is None else LastStep(**last_step))


@dataclass(frozen=True)
class ModelSection:
    """One model version's part of a snapshot: whose sessions, and the shapes of their rows."""

    model: ModelIdentity
    rows: dict[str, tuple[int, ...]]  # the pool's row arrays: name -> shape of one session's row, in file order

    def to_json(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "rows": self.rows}

    @staticmethod
    def from_json(entry: dict) -> ModelSection:
        return ModelSection(ModelIdentity(**entry["model"]),
                            {name: tuple(shape) for name, shape in entry["rows"].items()})


@dataclass(frozen=True)
class SnapshotHeader:
    models: list[ModelSection]  # chunks name their model by its index here
    written_at: float = 0.0  # unix seconds

    def to_json(self) -> bytes:
        return json.dumps({"models": [section.to_json() for section in self.models],
                           "written_at": self.written_at}).encode()

    @staticmethod
    def from_json(data: bytes, version: int) -> SnapshotHeader:
        entry = json.loads(data)
        sections = [entry] if version == 1 else entry["models"]
        return SnapshotHeader([ModelSection.from_json(section) for section in sections], entry["written_at"])


class SnapshotWriter:
    """`with SnapshotWriter(path, header) as writer: writer.write_chunk(...)`: the file appears whole or not at all.

    Until the block ends without an error, `path` keeps its previous content; on an error the
    temporary file is removed and the error goes on.
    """

    def __init__(self, path: Path, header: SnapshotHeader):
        self.path = path
        self.header = header
        self.sessions = 0
        self._digest = hashlib.sha256()
        self._file: BinaryIO | None = None

    def __enter__(self) -> SnapshotWriter:
        handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._temporary = Path(temporary)
        self._file = os.fdopen(handle, "wb")
        try:
            self._write(MAGIC, _U32.pack(FORMAT_VERSION))
            self._write_framed(self.header.to_json())
        except BaseException:
            self._discard()
            raise
        return self

    def write_chunk(self, model: int, records: Sequence[SessionRecord], rows: Sequence[np.ndarray]) -> None:
        """Sessions of the header's `model`-th model and their rows: one array `[len(records), *row_shape]` per row
        of that model, in header order."""
        if not records:
            return
        shapes = [(len(records), *shape) for shape in self.header.models[model].rows.values()]
        if [array.shape for array in rows] != shapes:
            raise ValueError(f"rows of shapes {[a.shape for a in rows]} do not match the header's {shapes}")
        chunk = {"model": model, "sessions": [dataclasses.asdict(record) for record in records]}
        self._write_framed(json.dumps(chunk).encode())
        self._write(*(np.ascontiguousarray(array, _ROW_DTYPE).data for array in rows))
        self.sessions += len(records)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if error is not None:
            self._discard()
            return
        try:
            self._write(_U32.pack(0), _U64.pack(self.sessions))
            self._file.write(self._digest.digest())
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._temporary, self.path)
        except BaseException:
            self._discard()
            raise
        _fsync_directory(self.path.parent)  # the rename itself survives a power cut only once its directory is synced

    def _write_framed(self, data: bytes) -> None:
        self._write(_U32.pack(len(data)), data)

    def _write(self, *parts: bytes | memoryview) -> None:
        for part in parts:
            self._digest.update(part)
            self._file.write(part)

    def _discard(self) -> None:
        self._file.close()
        self._temporary.unlink(missing_ok=True)


def remove_leftovers(path: Path) -> list[Path]:
    """Delete temporary files that writers of `path` left behind when they crashed; return them."""
    leftovers = list(path.parent.glob(f".{path.name}.*.tmp"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@dataclass(frozen=True)
class Snapshot:
    """A verified snapshot file: whole (its digest matches), its header read."""

    path: Path
    version: int
    header: SnapshotHeader
    sessions: int

    def chunks(self) -> Iterator[tuple[int, list[SessionRecord], tuple[np.ndarray, ...]]]:
        """The sessions in file order, a chunk at a time: the index of their model in the header, their records, and
        one array `[sessions, *row_shape]` per row name of that model."""
        with self.path.open("rb") as file:
            file.seek(len(MAGIC) + _U32.size)
            file.seek(_read_u32(file), os.SEEK_CUR)  # past the header
            while length := _read_u32(file):
                chunk = json.loads(_read_exactly(file, length))
                model, entries = (0, chunk) if self.version == 1 else (chunk["model"], chunk["sessions"])
                records = [SessionRecord.from_json(entry) for entry in entries]
                rows = self.header.models[model].rows
                yield model, records, tuple(_read_rows(file, len(records), shape) for shape in rows.values())


def open_snapshot(path: Path) -> Snapshot:
    """The snapshot at `path`, checked whole; SnapshotRefused otherwise. Whose sessions may load is the caller's
    to decide from the header, before a single session is handed out."""
    with path.open("rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(0)
        if _read_exactly(file, len(MAGIC), "the magic") != MAGIC:
            raise SnapshotRefused(f"{path} is not an rnnserve snapshot (no {MAGIC!r} at its start)")
        version = _read_u32(file)
        if version not in READABLE_VERSIONS:
            raise SnapshotRefused(f"{path} has snapshot format version {version}; this rnnserve reads "
                                  f"{', '.join(map(str, READABLE_VERSIONS))}")
        try:
            header = SnapshotHeader.from_json(_read_exactly(file, _read_u32(file), "the header"), version)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise SnapshotRefused(f"{path} has an unreadable header ({err})") from None
        if size < file.tell() + _U32.size + _U64.size + _DIGEST_BYTES:
            raise SnapshotRefused(f"{path} is truncated: it ends before its trailer")
        file.seek(0)
        digest = hashlib.sha256()
        remaining = size - _DIGEST_BYTES
        while remaining:
            block = file.read(min(remaining, 1 << 20))
            digest.update(block)
            remaining -= len(block)
        if file.read(_DIGEST_BYTES) != digest.digest():
            raise SnapshotRefused(f"{path} is corrupt or truncated: its sha256 does not match its content")
        file.seek(size - _DIGEST_BYTES - _U64.size)
        sessions = _U64.unpack(file.read(_U64.size))[0]
    return Snapshot(path, version, header, sessions)


def _read_exactly(file: BinaryIO, size: int, what: str = "a chunk") -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise SnapshotRefused(f"{file.name} is truncated: it ends inside {what}")
    return data


def _read_u32(file: BinaryIO) -> int:
    return _U32.unpack(_read_exactly(file, _U32.size, "a length"))[0]


def _read_rows(file: BinaryIO, sessions: int, row_shape: tuple[int, ...]) -> np.ndarray:
    shape = (sessions, *row_shape)
    data = _read_exactly(file, int(np.prod(shape)) * _ROW_DTYPE.itemsize, "a block of rows")
    return np.frombuffer(data, _ROW_DTYPE).reshape(shape)
