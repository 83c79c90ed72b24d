"""One exception hierarchy for every failure the server can answer, mapped from the status in one place.

The server says *why* a call failed in machine-readable details (google.rpc.ErrorInfo with
domain "rnnserve", google.rpc.BadRequest, google.rpc.RetryInfo). Unary calls carry them in the
trailers, Stream and StepBatch answers carry the same google.rpc.Status in-band; both go through
`error_from_status`, so `except SessionExpired` means the same thing whichever call raised it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "rnnserve"

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, as google.rpc.BadRequest names it."""

    field: str
    description: str


class RnnserveError(Exception):
    """A call the server (or the transport) refused; `reason` tells the cases of one code apart."""

    def __init__(self, code: grpc.StatusCode, details: str, *, reason: str | None = None,
                 metadata: dict[str, str] | None = None, retry_after: float | None = None,
                 field_violations: tuple[FieldViolation, ...] = ()):
        labels = [code.name] + ([reason] if reason and reason != code.name else [])
        super().__init__(f"{details} ({', '.join(labels)})")
        self.code = code
        self.details = details
        self.reason = reason
        self.metadata = metadata or {}
        self.retry_after = retry_after
        self.field_violations = field_violations

    def _metadata_int(self, key: str) -> int | None:
        """A number the server put in ErrorInfo.metadata (where every value is a string); None if absent."""
        value = self.metadata.get(key)
        return int(value) if value is not None else None


class NotFound(RnnserveError):
    """The named session, model or state does not exist here."""


class SessionNotFound(NotFound):
    """The session never existed, was closed, or belongs to another caller."""


class SessionExpired(SessionNotFound):
    """The session stayed idle longer than its time-to-live."""


class SessionEvicted(SessionNotFound):
    """The session was removed to make room under the server's session cap."""


class SessionLost(SessionNotFound):
    """The session existed, but its stored copy is gone (the session store restarted empty, or the replica holding
    it died before storing it); `last_replica` and `last_position` say what the server knows of it."""

    @property
    def last_replica(self) -> str | None:
        return self.metadata.get("last_replica")

    @property
    def last_position(self) -> int | None:
        return self._metadata_int("last_position")


class ModelNotFound(NotFound):
    """No model of that name is loaded."""


class ModelRetiring(RnnserveError):
    """That model version only finishes the sessions it has (it is unloading): omit the version to get the default."""


class ModelIsDefault(RnnserveError):
    """A default version cannot be unloaded: make another version the default first (Admin)."""


class ModelRefused(RnnserveError):
    """The bundle failed its checks (files, manifest, parity self-test); the server serves what it served before."""


class InvalidArgument(RnnserveError):
    """A request field is out of range; `field_violations` names each field and its limit."""


class PositionMismatch(RnnserveError):
    """The session is not at the position the step expected: another step got there first."""

    @property
    def actual_position(self) -> int | None:
        return self._metadata_int("actual_position")


class RewindBeyondDepth(RnnserveError):
    """More tokens to undo than the server keeps for the session; `rewindable` is how many it can undo now."""

    @property
    def rewindable(self) -> int | None:
        return self._metadata_int("rewindable")


class IncompatibleState(RnnserveError):
    """An exported session of another model or format version: import it where the same bundle is served."""


class StateNotFound(NotFound):
    """No named state by that name (`states()` lists those there are)."""


class StateIsShipped(RnnserveError):
    """The named state ships with the model's bundle: only registered states can be deleted or replaced."""


class CapacityExhausted(RnnserveError):
    """The session table is full and the server's policy refuses a new session, or the caller's identity
    already holds the most sessions one identity may (the server's --max-sessions-per-identity)."""


class Unavailable(RnnserveError):
    """The server cannot be reached or is shutting down; a retry (perhaps elsewhere) may succeed."""


class DeadlineExceeded(RnnserveError):
    """The call's deadline passed; the server leaves the session as it was."""


class Unauthenticated(RnnserveError):
    """The server wants a valid bearer token (`token=` / `--token`)."""


_BY_REASON: dict[str, type[RnnserveError]] = {
    "SESSION_NOT_FOUND": SessionNotFound,
    "SESSION_EXPIRED": SessionExpired,
    "SESSION_EVICTED": SessionEvicted,
    "SESSION_LOST": SessionLost,
    "MODEL_NOT_FOUND": ModelNotFound,
    "POSITION_MISMATCH": PositionMismatch,
    "INVALID_ARGUMENT": InvalidArgument,
    "CAPACITY_EXHAUSTED": CapacityExhausted,
    "SHUTTING_DOWN": Unavailable,
    "REWIND_BEYOND_DEPTH": RewindBeyondDepth,
    "INCOMPATIBLE_STATE": IncompatibleState,
    "STATE_NOT_FOUND": StateNotFound,
    "STATE_IS_SHIPPED": StateIsShipped,
    "MODEL_RETIRING": ModelRetiring,
    "MODEL_IS_DEFAULT": ModelIsDefault,
    "MODEL_REFUSED": ModelRefused,
}

# For statuses without an ErrorInfo: transport failures, deadlines, other servers and proxies.
_BY_CODE: dict[grpc.StatusCode, type[RnnserveError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: PositionMismatch,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_from_status(status: status_pb2.Status) -> RnnserveError:
    """The exception for a google.rpc.Status, chosen by its ErrorInfo reason, else by its code."""
    code = _STATUS_CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    info, bad_request, retry = (error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(),
                                error_details_pb2.RetryInfo())
    for detail in status.details:
        for message in (info, bad_request, retry):
            if detail.Is(message.DESCRIPTOR):
                detail.Unpack(message)
    reason = info.reason if info.domain == DOMAIN else None
    retry_after = retry.retry_delay.ToTimedelta().total_seconds() if retry.HasField("retry_delay") else None
    error_type = _BY_REASON.get(reason or "", _BY_CODE.get(code, RnnserveError))
    violations = tuple(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return error_type(code, status.message, reason=reason, metadata=dict(info.metadata) if reason else None,
                      retry_after=retry_after, field_violations=violations)


def error_from_rpc(error: grpc.RpcError) -> RnnserveError:
    """The exception for a failed unary or streaming call (sync or asyncio), from its trailers."""
    status = rpc_status.from_call(error)
    if status is None:  # no details in the trailers: a transport failure or a plain status
        status = status_pb2.Status(code=error.code().value[0], message=error.details() or "")
    return error_from_status(status)


@contextmanager
def raising_rnnserve_errors() -> Iterator[None]:
    """Turn a failed call inside the block into its RnnserveError (also around asyncio awaits)."""
    try:
        yield
    except grpc.RpcError as error:
        raise error_from_rpc(error) from None
