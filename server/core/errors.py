"""The errors rnnserve answers, each carrying its gRPC status code and machine-readable details.

Clients must tell "expired", "evicted", "never existed", "busy, retry later" and "your bug"
apart without parsing messages, so every error a caller can cause is one of these types, and
`to_status` turns any exception into the one `google.rpc.Status` that both a failed unary call
(through the interceptor) and an in-band `StepResponse.error` carry. Anything else is a server
fault and the only thing ever answered INTERNAL.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "rnnserve"

log = logging.getLogger(__name__)


class RnnserveError(Exception):
    """An error with a known cause; subclasses fix the status code and the ErrorInfo reason."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str | None = None  # an ErrorReason name of the .proto; None sends no ErrorInfo
    retry_after_seconds: float | None = None  # set where retrying later may succeed

    def __init__(self, message: str, **metadata: object):
        super().__init__(message)
        self.metadata = {key: str(value) for key, value in metadata.items()}
        # Where the step's session stood when the step was refused in its turn, for an in-band answer;
        # None when that is not known (then the session's position when the answer is written is reported).
        self.session_position: int | None = None

    def extra_details(self) -> list[Message]:
        """Details beyond ErrorInfo and RetryInfo, for the subclasses that have more to say."""
        return []


class SessionNotFound(RnnserveError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "SESSION_NOT_FOUND"

    def __init__(self, session_id: str, how: str = "does not exist"):
        super().__init__(f"session {session_id!r} {how}", session_id=session_id)
        self.how = how


class SessionExpired(SessionNotFound):
    reason = "SESSION_EXPIRED"

    def __init__(self, session_id: str):
        super().__init__(session_id, "expired after its idle time-to-live")


class SessionEvicted(SessionNotFound):
    reason = "SESSION_EVICTED"

    def __init__(self, session_id: str):
        super().__init__(session_id, "was evicted to make room under the session cap")


class SessionLost(SessionNotFound):
    """A session that existed but whose stored copy is gone: its store restarted empty, or the replica that held
    it died before writing its state. Told apart from an unknown id, with what is known of where it was."""

    reason = "SESSION_LOST"

    def __init__(self, session_id: str, why: str, last_replica: str = "", last_position: int | None = None):
        known = ([f"last held by replica {last_replica}"] if last_replica else []) + (
            [f"last stored at position {last_position}"] if last_position is not None else [])
        super().__init__(session_id, f"was lost: {why}" + (f" ({', '.join(known)})" if known else ""))
        if last_replica:
            self.metadata["last_replica"] = last_replica
        if last_position is not None:
            self.metadata["last_position"] = str(last_position)


class ModelNotFound(RnnserveError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"

    def __init__(self, name: str, loaded: list[str], version: str = "", how: str = ""):
        what = f"model {name!r}" + (f" version {version!r}" if version else "")
        super().__init__(f"{what} {how or 'is not loaded'} (loaded: {', '.join(loaded)})", model=name,
                         version=version)


class ModelRetiring(RnnserveError):
    """A version asked for by name that serves its running sessions only: it is unloading."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MODEL_RETIRING"

    def __init__(self, name: str, version: str, default: str):
        super().__init__(f"model {name!r} version {version!r} is retiring: it serves the sessions it has until they "
                         f"end and takes no new ones; the default version is {default!r}", model=name,
                         version=version)


class ModelIsDefault(RnnserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MODEL_IS_DEFAULT"

    def __init__(self, name: str, version: str):
        super().__init__(f"model {name!r} version {version!r} is a default: make another version (or model) the "
                         "default first", model=name, version=version)


class ModelRefused(RnnserveError):
    """A bundle that failed its checks (unreadable, inconsistent, or its parity self-test); nothing changed."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MODEL_REFUSED"

    def __init__(self, where: str, why: str):
        super().__init__(f"{where} refused: {why}", bundle=where)


class InvalidArgument(RnnserveError):
    """A request field out of range; the message and BadRequest name the field and its limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str):
        super().__init__(f"{field}: {description}", field=field)
        self.field = field
        self.description = description

    def extra_details(self) -> list[Message]:
        violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.description)
        return [error_details_pb2.BadRequest(field_violations=[violation])]


class PositionMismatch(RnnserveError):
    """The step expected the session elsewhere: the client's view is stale, so nothing was applied."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "POSITION_MISMATCH"

    def __init__(self, session_id: str, expected: int, actual: int):
        super().__init__(f"session {session_id!r} is at position {actual}, not the expected {expected}",
                         session_id=session_id, expected_position=expected, actual_position=actual)
        self.actual = actual


class CapacityExhausted(RnnserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "CAPACITY_EXHAUSTED"
    retry_after_seconds = 1.0  # sessions close and expire; a slot may free up soon

    def __init__(self, max_sessions: int):
        super().__init__(f"the session table is full ({max_sessions} sessions) and its policy refuses new ones",
                         max_sessions=max_sessions)

    def extra_details(self) -> list[Message]:
        return [_quota_failure("server", f"at most {self.metadata['max_sessions']} sessions")]


class IdentityQuotaExhausted(RnnserveError):
    """The caller's identity holds as many sessions (or named states) as one identity may. Same reason as a full
    table, told apart by QuotaFailure's subject; no RetryInfo: only the caller's own closing, expiry or
    deleting makes room."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "CAPACITY_EXHAUSTED"

    def __init__(self, limit: int, what: str = "sessions", remedy: str = "close one first",
                 setting: str = "max_sessions_per_identity"):
        """`setting`: the server setting that is the limit, the ErrorInfo metadata key that holds it."""
        super().__init__(f"this caller's identity already holds {limit} {what}, the most one identity may: {remedy}",
                         **{setting: limit})
        self.description = f"at most {limit} {what}"

    def extra_details(self) -> list[Message]:
        return [_quota_failure("identity", self.description)]


class RewindBeyondDepth(RnnserveError):
    """More tokens to undo than the session keeps: the server's depth, or what it has read since it started."""

    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "REWIND_BEYOND_DEPTH"

    def __init__(self, session_id: str, tokens: int, rewindable: int, depth: int):
        super().__init__(f"tokens: cannot undo {tokens} tokens of session {session_id!r}: {rewindable} can be undone "
                         f"now (the rewind depth is {depth}, --rewind-depth)", session_id=session_id,
                         rewindable=rewindable, depth=depth)


class IncompatibleState(RnnserveError):
    """An exported session of another model or format version: no fault of the blob, a mismatch of servers."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "INCOMPATIBLE_STATE"


class StateNotFound(RnnserveError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "STATE_NOT_FOUND"

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"no named state {name!r} (known: {', '.join(known) or 'none'})", name=name)


class StateIsShipped(RnnserveError):
    """A state for everyone (shipped in the bundle, or shared through Admin), which callers may use but not change."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "STATE_IS_SHIPPED"

    def __init__(self, name: str, how: str = "ships with the model's bundle"):
        super().__init__(f"the named state {name!r} {how} and cannot be replaced or deleted", name=name)


class ServerFault(RnnserveError):
    """A failure of the server itself, already logged where it happened. Nothing was applied."""

    code = grpc.StatusCode.INTERNAL


class ShuttingDown(RnnserveError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"
    retry_after_seconds = 0.0  # another replica can take it at once

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry on another replica")


def _quota_failure(subject: str, description: str) -> error_details_pb2.QuotaFailure:
    return error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
        subject=subject, description=description)])


class SessionUnavailable(RnnserveError):
    """A session this replica cannot serve now, though it may exist: moved to the session store, live on another
    replica, or in a store that cannot be read. A retry (routed again, or after the store recovers) may succeed;
    nothing was applied. No ErrorInfo reason of its own: UNAVAILABLE with RetryInfo already says what to do."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, session_id: str, why: str, retry_after_seconds: float = 0.0):
        super().__init__(f"session {session_id!r} {why}; retry", session_id=session_id)
        self.retry_after_seconds = retry_after_seconds


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def to_status(error: BaseException) -> status_pb2.Status:
    """The one mapping from an exception to what the caller receives.

    Our own errors keep their code and details; anything else is a server fault, logged here
    with its traceback and answered INTERNAL without internals in the message.
    """
    if not isinstance(error, RnnserveError):
        log.error("unexpected error answered INTERNAL", exc_info=error)
        error = ServerFault("internal server error")
    details = error.extra_details()
    if error.reason is not None:
        details.insert(0, error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata))
    if error.retry_after_seconds is not None:
        details.append(_retry_info(error.retry_after_seconds))
    return status_pb2.Status(code=error.code.value[0], message=str(error), details=[_packed(d) for d in details])
