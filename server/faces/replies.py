"""The replies of one stream, handed to its writer in request order as each becomes ready.

A stream may carry steps of many sessions, so its steps must be in flight together (read on,
don't wait for each answer) while the answers still go out in order. The writer sleeps until
the oldest reply is ready and is woken by that reply's future alone, not by every new request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

Request = TypeVar("Request")


class InOrder(Generic[Request]):
    def __init__(self) -> None:
        self._pending: deque[tuple[Request, asyncio.Future]] = deque()
        self._ready: asyncio.Future[None] | None = None  # set while the writer sleeps
        self._closed = False

    def push(self, request: Request, reply: asyncio.Future) -> None:
        self._pending.append((request, reply))
        if self._ready is not None and len(self._pending) == 1:
            reply.add_done_callback(self._wake)

    def close(self) -> None:
        """No more requests: the iteration ends after the pending replies."""
        self._closed = True
        self._wake()

    def abandon(self) -> None:
        """Withdraw every reply not yet handed out (their steps are then not applied) and end the iteration.

        The writer ends after the message it may be writing, never in the middle of one: a write
        cut off in flight leaves grpc unable to send the call's status.
        """
        for _, reply in self._pending:
            reply.cancel()
        self._pending.clear()
        self.close()

    def _wake(self, _: object = None) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def __aiter__(self) -> InOrder[Request]:
        return self

    async def __anext__(self) -> tuple[Request, asyncio.Future]:
        """The oldest request with its settled reply future."""
        while True:
            if self._pending:
                request, reply = self._pending[0]
                if reply.done():
                    self._pending.popleft()
                    return request, reply
                reply.add_done_callback(self._wake)
            elif self._closed:
                raise StopAsyncIteration
            self._ready = asyncio.get_running_loop().create_future()
            try:
                await self._ready
            finally:
                self._ready = None


async def answer_in_order(requests: AsyncIterator[Request], submit: Callable[[Request], asyncio.Future],
                          write: Callable[[InOrder[Request]], Awaitable[None]]) -> None:
    """A stream's loop: each request submitted as it arrives, while `write` sends the replies in request order.

    A request that does not parse ends the stream with its status once the writer has stopped; a cancelled
    stream withdraws the replies not yet handed out.
    """
    replies: InOrder[Request] = InOrder()
    writer = asyncio.create_task(write(replies))
    try:
        try:
            async for request in requests:
                replies.push(request, submit(request))
        except Exception:
            replies.abandon()
            await writer
            raise
        replies.close()
        await writer
    finally:  # also when cancelled, the call then over and nothing more to write
        writer.cancel()
        replies.abandon()
