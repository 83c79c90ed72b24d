"""When to try a call again: exponential backoff with jitter, on UNAVAILABLE (and a CANCELLED we did not ask for).

UNAVAILABLE means the call may not have reached the server (no connection yet, or a server
draining), so only calls that are harmless to repeat are retried: reads, closes, and steps
that carry expected_position (the server answers an exact retry from its record instead of
applying it twice), and resets and rewinds that carry it (a resend whose first try landed is
refused as a PositionMismatch). Never forks, imports or registrations: a resend whose first try
landed would make or replace something again. A CANCELLED status that reaches us (our own
cancellation raises asyncio.CancelledError or is never answered) is the same case as UNAVAILABLE:
a stopping gRPC server cancels the calls that reach it after it began to stop, before they start.
So is an UNKNOWN without an rnnserve ErrorInfo: the server never answers UNKNOWN (its faults are
INTERNAL), so that one comes from the transport, e.g. a proxy whose replica died mid-call ("Stream
removed"), and the call may or may not have arrived. Every other code is the server's considered
answer and is raised at once.
Jitter keeps many clients that lost the same server from reconnecting in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from rnnserve.client.errors import RnnserveError, Unavailable


# Codes that, without an rnnserve ErrorInfo, tell of the transport rather than of the server (see above).
TRANSPORT_CODES = (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each wait is scaled by a random factor in [1 - jitter, 1 + jitter]

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")

    def backoff(self, attempt: int, error: RnnserveError, retry_safe: bool) -> float:
        """Seconds to wait before repeating a call whose `attempt`-th try (from 0) failed with `error`.

        Raises `error` when the call must not be repeated. A RetryInfo delay from the server is
        a floor: it knows better than our schedule when it will have room again.
        """
        retryable = isinstance(error, Unavailable) or error.code in TRANSPORT_CODES and error.reason is None
        if not (retry_safe and retryable and attempt < self.retries):
            raise error from None
        backoff = min(self.max_backoff, self.initial_backoff * self.multiplier ** attempt)
        return max(backoff * random.uniform(1 - self.jitter, 1 + self.jitter), error.retry_after or 0.0)
