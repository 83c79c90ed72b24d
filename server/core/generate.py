"""Continuing a session on the server, token by token, each sent as soon as it is chosen.

The session must end at the last token the client was sent, even when the call is cancelled.
A cancel can interrupt a send after its message went out (the client has the token, the
handler never learns it was written), so each token is queued for the model before its send
starts, and its read is shielded from cancellation: a cancelled call's session has read every
token sent, and at most one more, the one whose send the cancel interrupted. (Sending first and
reading after left the session a token behind the client when the cancel struck mid-send.)
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from rnnserve.server.core.batcher import NEXT_LOGITS, Hold
from rnnserve.server.core.sampling import Sampler
from rnnserve.server.model.state_pool import StatePool
from rnnserve.vocab import AnyVocabulary


class Finish(enum.Enum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # a stop string was generated


@dataclass(frozen=True, slots=True)
class GeneratedToken:
    token_id: int
    text: str
    probability: float
    position: int  # the session's position once it has read this token
    finish: Finish | None  # set on the last token


class StopStrings:
    """Whether the text generated so far ends with a stop string, keeping only the tail that can matter."""

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(stops)
        self._keep = max(map(len, self._stops), default=0)
        self._tail = ""

    def hit_after(self, text: str) -> bool:
        if not self._stops:
            return False
        self._tail = (self._tail + text)[-self._keep:]
        return any(self._tail.endswith(stop) for stop in self._stops)


async def continue_session(hold: Hold, pool: StatePool, vocab: AnyVocabulary, sampler: Sampler, max_tokens: int,
                           stops: StopStrings, send: Callable[[GeneratedToken], Awaitable[None]]) -> None:
    """Generate up to `max_tokens` tokens after what the held session has read, sending each.

    Each token carries the text it adds to the stream, which for subword ids may be empty (a token that
    ends inside a UTF-8 character waits for the next) and is never half a character; stop strings are
    matched on that decoded text, so they match across token boundaries.
    """
    session = hold.session
    detokenizer = vocab.detokenizer()
    for count in range(1, max_tokens + 1):
        token, probability = sampler.choose(pool.row(NEXT_LOGITS, session.slot))  # [vocab]
        text = detokenizer.push(token)
        finish = Finish.STOP if stops.hit_after(text) else Finish.LENGTH if count == max_tokens else None
        if finish is not None:
            text += detokenizer.flush()  # bytes of a character the stream ends inside, as U+FFFD
        generated = GeneratedToken(token, text, probability, session.position + 1, finish)
        read = hold.submit(np.array([token], np.int64))
        await send(generated)
        await asyncio.shield(read)
        if finish is not None:
            return
