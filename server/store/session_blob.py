"""A session as a portable blob: what ExportSession answers and ImportSession takes.

The blob is everything a session's future depends on (its state rows, its position, the named
initial state it resets to, the checkpoints and token log that rewinding needs) and nothing about
where it lived (id, owner, time-to-live are the importer's), so a session moves between servers
of the same bundle and continues bit-exactly. It is checked whole before anything is created:
a damaged blob is the caller's mistake (INVALID_ARGUMENT), one of another model or format
version a mismatch of servers (FAILED_PRECONDITION).

Layout, little-endian, format version 1:

    magic b"RNNSESS\\0", u32 format version
    u32 n, n bytes of header JSON: {"model": {"name", "version", "sha256"}, "rows": {name: row shape},
        "position", "initial_state", "initial_rows": bool, "checkpoints": [[position, has rows]], "tokens": count}
    the session's rows, then the initial rows (if any), then each checkpoint's rows (if it has them):
        each a float32 row per tensor, tensors in header order
    the token log: int32 x count
    the 32-byte sha256 of every byte before it
"""

from __future__ import annotations

import hashlib
import json
import struct
from array import array
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from rnnserve.server.core.errors import IncompatibleState, InvalidArgument
from rnnserve.server.core.history import TOKEN_TYPE, Checkpoint
from rnnserve.server.model.state_pool import Row
from rnnserve.server.store.snapshot import ModelIdentity

MAGIC = b"RNNSESS\0"
FORMAT_VERSION = 1
_U32 = struct.Struct("<I")
_DIGEST_BYTES = hashlib.sha256().digest_size
_ROW_DTYPE = np.dtype("<f4")
_TOKEN_DTYPE = np.dtype("<i4")
FIELD = "state"  # the request field a refusal names


@dataclass(frozen=True)
class PortableSession:
    """A session apart from any server: what the blob carries."""

    position: int
    rows: Row
    initial_state: str  # "" for zeros
    initial_rows: Row | None  # None for zeros
    checkpoints: list[Checkpoint]  # empty when the exporting server kept no history
    tokens: array  # int32, read since checkpoints[0].position


def encode(session: PortableSession, model: ModelIdentity, shapes: Mapping[str, tuple[int, ...]]) -> bytes:
    header = {"model": {"name": model.name, "version": model.version, "sha256": model.sha256},
              "rows": {name: list(shape) for name, shape in shapes.items()}, "position": session.position,
              "initial_state": session.initial_state, "initial_rows": session.initial_rows is not None,
              "checkpoints": [[c.position, c.rows is not None] for c in session.checkpoints],
              "tokens": len(session.tokens)}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    rows = [session.rows, session.initial_rows, *(c.rows for c in session.checkpoints)]
    parts = [MAGIC, _U32.pack(FORMAT_VERSION), _U32.pack(len(header_bytes)), header_bytes,
             *(np.asarray(row[name], _ROW_DTYPE).tobytes() for row in rows if row is not None for name in shapes),
             np.asarray(session.tokens, _TOKEN_DTYPE).tobytes()]
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def exported_model(blob: bytes) -> ModelIdentity:
    """The model `blob` was exported from, so that the server can pick that model; refused like `decode`."""
    return ModelIdentity(**_header(blob)[1]["model"])


def decode(blob: bytes, model: ModelIdentity, shapes: Mapping[str, tuple[int, ...]],
           vocab_size: int) -> PortableSession:
    """The session in `blob`, checked whole against `model` and its rows; refused with the reason otherwise.

    The checksum catches damage, not forgery, so everything the server later relies on (positions
    that add up, token ids it can replay) is checked too: a crafted blob is refused like a damaged one.
    """
    reader, header = _header(blob)
    try:
        exported = ModelIdentity(**header["model"])
        position, tokens = int(header["position"]), int(header["tokens"])
        checkpoints = [(int(at), bool(has_rows)) for at, has_rows in header["checkpoints"]]
        exported_shapes = {name: tuple(shape) for name, shape in header["rows"].items()}
        initial_state, has_initial_rows = str(header["initial_state"]), bool(header["initial_rows"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise InvalidArgument(FIELD, f"unreadable header ({err})") from None
    positions = [at for at, _ in checkpoints]
    beyond = positions and positions[-1] > position
    if min(position, tokens, *positions) < 0 or positions != sorted(positions) or beyond:
        raise InvalidArgument(FIELD, "its position, token count and checkpoints are inconsistent")
    if exported.sha256 != model.sha256:
        raise IncompatibleState(f"{FIELD}: the session was exported from {exported.describe()}, but this server serves "
                                f"{model.describe()}: its state means nothing to this model")
    if exported_shapes != dict(shapes):
        raise IncompatibleState(f"{FIELD}: the blob has state rows {exported_shapes}; this server's are {dict(shapes)}")
    rows = reader.row(shapes)
    initial_rows = reader.row(shapes) if has_initial_rows else None
    kept = [Checkpoint(at, reader.row(shapes) if has_rows else None) for at, has_rows in checkpoints]
    log = np.frombuffer(reader.take(tokens * _TOKEN_DTYPE.itemsize, "the token log"), _TOKEN_DTYPE)
    if reader.offset != len(blob) - _DIGEST_BYTES:
        raise InvalidArgument(FIELD, "has bytes its header does not account for")
    if kept and kept[0].position + len(log) != position:
        raise InvalidArgument(FIELD, "its token log does not lead from its first checkpoint to its position")
    if len(log) and not 0 <= log.min() <= log.max() < vocab_size:
        raise InvalidArgument(FIELD, f"its token log holds ids outside the vocabulary [0, {vocab_size - 1}]")
    return PortableSession(position, rows, initial_state, initial_rows, kept, array(TOKEN_TYPE, log))


def _header(blob: bytes) -> tuple[_Reader, dict]:
    """The blob's header, once its magic, format version and checksum are right; a reader after it."""
    reader = _Reader(blob)
    if reader.take(len(MAGIC), "the magic") != MAGIC:
        raise InvalidArgument(FIELD, f"not an exported rnnserve session (no {MAGIC!r} at its start)")
    version = reader.u32()
    if version != FORMAT_VERSION:
        raise IncompatibleState(f"{FIELD}: the blob has session format version {version}; "
                                f"this server reads {FORMAT_VERSION}")
    if len(blob) < _DIGEST_BYTES or hashlib.sha256(blob[:-_DIGEST_BYTES]).digest() != blob[-_DIGEST_BYTES:]:
        raise InvalidArgument(FIELD, "corrupt or truncated: its sha256 checksum does not match its content")
    try:
        header = json.loads(reader.take(reader.u32(), "the header"))
        ModelIdentity(**header["model"])
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidArgument(FIELD, f"unreadable header ({err})") from None
    return reader, header


class _Reader:
    def __init__(self, blob: bytes):
        self.blob = blob
        self.offset = 0

    def take(self, size: int, what: str) -> bytes:
        if self.offset + size > len(self.blob) - _DIGEST_BYTES:
            raise InvalidArgument(FIELD, f"truncated: it ends inside {what}")
        data = self.blob[self.offset: self.offset + size]
        self.offset += size
        return data

    def u32(self) -> int:
        return _U32.unpack(self.take(_U32.size, "a length"))[0]

    def row(self, shapes: Mapping[str, tuple[int, ...]]) -> Row:
        return {name: np.frombuffer(self.take(int(np.prod(shape)) * _ROW_DTYPE.itemsize, f"the rows of {name}"),
                                    _ROW_DTYPE).reshape(shape).astype(np.float32)
                for name, shape in shapes.items()}
