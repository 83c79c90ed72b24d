"""Python clients for rnnserve: `Client` (blocking) and `AsyncClient` (asyncio), plus `rnnserve-client`.

Both wrap one grpc channel: sessions are context managers that close themselves, steps carry
the session's position so a retried step is never applied twice, and every failure is an
`RnnserveError` subclass chosen from the server's machine-readable reason. A session can also
be forked, reset, rewound, scored and peeked into without advancing, and exported to continue
elsewhere (`import_session`); named states (`register_state`) give new sessions a head start.
A server may serve several models and versions (`models()`; `session(model=, model_version=)`);
`client.admin` loads, unloads and chooses defaults, with an admin token of its own.
"""

from rnnserve.client.aio import AsyncAdmin, AsyncClient, AsyncSession, AsyncStepStream
from rnnserve.client.connection import TLS
from rnnserve.client.errors import (CapacityExhausted, DeadlineExceeded, FieldViolation, IncompatibleState,
                                    InvalidArgument, ModelIsDefault, ModelNotFound, ModelRefused, ModelRetiring,
                                    NotFound, PositionMismatch, RewindBeyondDepth, RnnserveError, SessionEvicted,
                                    SessionExpired, SessionLost, SessionNotFound, StateIsShipped, StateNotFound,
                                    Unauthenticated, Unavailable)
from rnnserve.client.sync import Admin, Client, Session, StepStream
from rnnserve.client.types import (Candidate, ContinuationScore, GeneratedToken, ModelInfo, NamedState, Prediction,
                                   SessionInfo)

__all__ = [
    "Admin", "AsyncAdmin", "AsyncClient", "AsyncSession", "AsyncStepStream", "Candidate", "CapacityExhausted",
    "Client", "ContinuationScore", "DeadlineExceeded", "FieldViolation", "GeneratedToken", "IncompatibleState",
    "InvalidArgument", "ModelInfo", "ModelIsDefault", "ModelNotFound", "ModelRefused", "ModelRetiring", "NamedState",
    "NotFound", "PositionMismatch", "Prediction",
    "RewindBeyondDepth", "RnnserveError", "Session", "SessionEvicted", "SessionExpired", "SessionInfo",
    "SessionLost", "SessionNotFound", "StateIsShipped", "StateNotFound", "StepStream", "TLS", "Unauthenticated",
    "Unavailable",
]
