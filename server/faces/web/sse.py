"""Server-sent events from a producer of messages, with the failure before the first event left to HTTP.

The producer runs as a task writing into a small queue (so a slow reader slows it, as gRPC's flow
control does). The response starts only once the first event or the end is known: a call that fails
before producing anything raises here, to be answered with its HTTP status and JSON error like any
other; a failure after that is the stream's last event, `event: error`. A reader that goes away
cancels the producer, as a cancelled gRPC call does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from starlette.responses import StreamingResponse

Send = Callable[[object], Awaitable[None]]
QUEUE_EVENTS = 16
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # and no proxy buffers the events either


@dataclass(frozen=True)
class _End:
    error: Exception | None


def encode(data: object, event: str | None = None) -> str:
    """One event: `data` as one line of JSON (or as is, for a string like OpenAI's "[DONE]")."""
    line = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return ("" if event is None else f"event: {event}\n") + f"data: {line}\n\n"


async def event_stream(produce: Callable[[Send], Awaitable[None]],
                       error_event: Callable[[Exception], str], last: str | None = None) -> StreamingResponse:
    """Run `produce(send)`; each object sent becomes an event, then `last` (if any) when it ends well,
    or `error_event(error)` when it fails after its first event. Raises what fails it before that."""
    queue: asyncio.Queue = asyncio.Queue(QUEUE_EVENTS)

    async def producing() -> None:
        try:
            await produce(queue.put)
        except Exception as error:  # noqa: BLE001  (answered to the reader, in or out of band)
            await queue.put(_End(error))
        else:
            await queue.put(_End(None))

    task = asyncio.create_task(producing())
    try:
        first = await queue.get()
    except BaseException:
        task.cancel()
        raise
    if isinstance(first, _End) and first.error is not None:
        raise first.error

    async def events(item: object) -> AsyncIterator[str]:
        try:
            while not isinstance(item, _End):
                yield encode(item)
                item = await queue.get()
            if item.error is not None:
                yield error_event(item.error)
            elif last is not None:
                yield encode(last)
        finally:
            task.cancel()

    return StreamingResponse(events(first), media_type="text/event-stream", headers=HEADERS)
