"""The sessions on their way back: answered moments ago, not stepped since.

A caller in a closed loop sends a session's next step when the last one is answered, so right
after a model call its sessions are the steps most likely to arrive next. Unary Step callers
bring them back one call at a time, a few hundred microseconds apart, and a batcher that runs
whatever is queued as soon as the model is free then splits them into calls of one or two
steps. Those are the dearest calls there are: a model call costs about as much for one row as
for a dozen (the reference LSTM, 2 cores: 880 us of CPU for one row, 57 us a row at 256), so at
256 unary callers more than half the calls carried a single step. Counting who is on the way
back lets the batcher wait for them, and only for them: a lone session is never on its way
back when its own step is queued, so it never waits.

The count forgets a session `horizon` seconds after its answer: one that has not come back by
then is not in a tight loop, and waiting for it would only add latency.
"""

from __future__ import annotations

from collections.abc import Hashable


class Returning:
    def __init__(self, horizon_seconds: float):
        self.horizon_seconds = horizon_seconds
        self._answered: dict[Hashable, float] = {}  # session -> when its last step was answered; oldest first

    def answered(self, session: Hashable, now: float) -> None:
        self._answered.pop(session, None)  # re-inserted last, so the dict stays in order of answer
        self._answered[session] = now

    def arrived(self, session: Hashable) -> None:
        self._answered.pop(session, None)

    def count(self, now: float) -> int:
        """Sessions answered within the horizon that have not stepped since."""
        answered, cutoff = self._answered, now - self.horizon_seconds
        while answered:
            oldest = next(iter(answered))
            if answered[oldest] > cutoff:
                break
            del answered[oldest]
        return len(answered)
