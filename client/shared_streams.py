"""`session.step()` at a stream's price: the steps of every session of a client over Stream calls it keeps open.

A unary Step costs the server a whole call per token (an HTTP/2 stream, a handler, a status and
trailers); a step on an open Stream costs a message each way. So a session's `step` sends its
request on a stream the client shares among its sessions and waits for the answer matched to it
(the server answers a stream in request order), and keeps what a unary step promises:
- order: a step whose session's last step is still unanswered on its stream (abandoned at a deadline or
  cancelled) goes on that stream behind it, which the server applies in order; any other is sent only after
  the session's last step was answered, so on any idle stream;
- retries: a stream that fails fails every step it carries with its status, and an in-band
  UNAVAILABLE fails its own step; each is then resent (on a new stream) or raised under the
  client's retry policy exactly as its unary call would be, so only steps carrying
  expected_position are resent, and the server answers a resend whose first try landed from its
  record;
- deadlines and cancellation: the caller stops waiting at its deadline (DeadlineExceeded) or when
  cancelled, and the answer, if one comes, is dropped, leaving the session's position where it was,
  so that a retry is recognised. A unary step is withdrawn if its deadline passes before it ran; a
  streamed one is not, so it may still apply: as a unary step whose deadline passed while it ran.
- routing: a server whose sessions move between replicas behind a proxy that routes by
  `x-session-id` says so in its Stream's initial metadata (`ROUTING_HEADER`); from then on each
  session gets a stream of its own carrying its id, so the proxy sends it to its replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Generic, TypeVar

import grpc

from rnnserve.client.connection import ROUTING_BY_SESSION, ROUTING_HEADER, SESSION_HEADER, Connection
from rnnserve.client.errors import DeadlineExceeded, RnnserveError, Unavailable, error_from_rpc, error_from_status
from rnnserve.v1 import rnnserve_pb2 as pb

_END_OF_REQUESTS = object()
# The most shared streams a client opens: as many steps in flight as this keep a stream each; more queue behind
# the least busy. HAProxy in front of replicas allows 1,000 streams on a connection (deploy/haproxy).
MOST_SHARED = 256

Stream = TypeVar("Stream", "_StepStream", "_AsyncStepStream")


def _ended() -> RnnserveError:
    """Why steps still waiting on a stream that ended without answering them failed: retried as UNAVAILABLE is."""
    return Unavailable(grpc.StatusCode.UNAVAILABLE, "the stream carrying the step ended before answering it")


def _broken(failure: grpc.RpcError) -> RnnserveError:
    """Why the steps on a stream whose call failed failed.

    The server answers its own faults in-band and goes on, so a call that ends INTERNAL without an
    rnnserve reason was broken under it (a proxy resetting the stream when its replica died): that
    is UNAVAILABLE, the step may or may not have arrived, as a unary call's UNKNOWN "Stream removed".
    """
    error = error_from_rpc(failure)
    if error.code == grpc.StatusCode.INTERNAL and error.reason is None:
        return Unavailable(grpc.StatusCode.UNAVAILABLE, f"the stream carrying the step broke: {error}")
    return error


def _deadline_exceeded() -> RnnserveError:
    return DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


def _checked(response: pb.StepResponse) -> pb.StepResponse:
    """The response, or its in-band error raised as the unary call would have raised it."""
    if response.HasField("error"):
        raise error_from_status(response.error)
    return response


def _routes_by_session(initial_metadata: Any) -> bool:
    return any(key == ROUTING_HEADER and value == ROUTING_BY_SESSION for key, value in initial_metadata or ())


class _Streams(Generic[Stream]):
    """The open streams of one client: shared ones, as many as it has steps in flight (up to `MOST_SHARED`), or
    one per session once the server says it routes sessions by id.

    A stream reads its messages one at a time, an await each, so one stream carrying every session's steps
    would hand the server its steps one by one, and the server would batch them one by one. So a step takes
    a shared stream that has nothing in flight, or opens one: under load as many streams as steps in flight,
    which the server reads together and batches, as it does a stream per session; a lone caller has one.
    A session whose last step is still on its stream (abandoned at a deadline or cancelled, and not yet
    answered) sends the next one there behind it, so that its steps reach the server in order. Only then:
    a session whose last step was answered takes any idle stream, never one where another session's step
    went since (which would queue its step behind that one, as nine steps in ten of 16 to 256 sessions in a
    closed loop were, behind one to four others, while most streams stood idle).
    """

    def __init__(self, connection: Connection, open_stream: Callable[[tuple, _Streams, bool], Stream]):
        self._connection = connection
        self._open_stream = open_stream
        self._shared: list[Stream] = []  # open shared streams
        self._idle: list[Stream] = []  # shared streams with nothing in flight, the last idle first
        # Each session's last stream, and how many requests that stream had taken with it, while the session is open
        self._last: dict[str, tuple[Stream, int]] = {}
        self._own: dict[str, Stream] = {}  # a stream per session, once the server routes sessions by id
        self._by_session = False  # set when a server answers that its sessions are routed by id
        self._lock = threading.Lock()  # the sync client's threads take streams while its readers give them back

    def _stream_for(self, session_id: str) -> Stream:
        with self._lock:
            if self._by_session:
                return self._own_stream(session_id)
            last = self._last.get(session_id)
            if last is not None and last[0].holds(last[1]):
                return last[0]
            while self._idle:
                stream = self._idle.pop()
                if stream.open and not stream.in_flight:  # it may have taken steps since it was idle
                    break
            else:
                if len(self._shared) < MOST_SHARED:
                    stream = self._open_stream(self._connection.metadata, self, True)
                    self._shared.append(stream)
                else:
                    stream = min(self._shared, key=lambda candidate: candidate.in_flight)
            return stream

    def _own_stream(self, session_id: str) -> Stream:
        stream = self._own.get(session_id)
        if stream is None or not stream.open:
            metadata = (*self._connection.metadata, (SESSION_HEADER, session_id))
            stream = self._own[session_id] = self._open_stream(metadata, self, False)
        return stream

    def routed(self, by_session: bool) -> None:
        """What a stream's first answer told: whether sessions are routed by id. If so, no stream is shared."""
        with self._lock:
            if not by_session or self._by_session:
                return
            self._by_session = True
            shared, self._shared, self._idle, self._last = self._shared, [], [], {}
        for stream in shared:
            stream.retire()

    def idle(self, stream: Stream) -> None:
        """A shared stream answered all it carried: the next step may take it."""
        with self._lock:
            if stream.open and not stream.in_flight:
                self._idle.append(stream)

    def ended(self, stream: Stream) -> None:
        with self._lock:
            if stream in self._shared:
                self._shared.remove(stream)

    def _send(self, request: pb.StepRequest) -> tuple[Stream, Any]:
        """The stream the request went out on and the future of its answer.

        A stream retired since it was chosen took nothing, so the request goes on a new one: never sent, it
        is no retry.
        """
        while True:
            stream = self._stream_for(request.session_id)
            answer = stream.send(request)
            if answer is not None:
                with self._lock:
                    # At least the request's own number: another thread's send on the stream in between makes
                    # the session wait for that one's answer too before it may move, which keeps its order.
                    self._last[request.session_id] = (stream, stream.sent)
                return stream, answer

    def _timeout(self, timeout: float | None) -> float | None:
        return self._connection.timeout if timeout is None else timeout

    def _failed(self, stream: Stream, error: RnnserveError) -> None:
        """A server refusing steps UNAVAILABLE (draining) takes no new ones here: the retry opens another stream."""
        if isinstance(error, Unavailable):
            stream.retire()

    def forget(self, session_id: str) -> None:
        """The session is closed: its own stream, if it has one, ends once it has answered."""
        with self._lock:
            self._last.pop(session_id, None)
            stream = self._own.pop(session_id, None)
        if stream is not None:
            stream.retire()

    def close(self) -> None:
        with self._lock:
            streams = [*self._shared, *self._own.values()]
            self._shared, self._idle, self._last, self._own = [], [], {}, {}
        for stream in streams:
            stream.close()


class _Answers:
    """What both kinds of stream keep: the futures of the steps sent and not yet answered, in sending order."""

    def __init__(self, owner: _Streams, shared: bool) -> None:
        self.open = True
        self.sent = 0  # requests taken
        self.answered = 0  # of those, the first `answered` have been answered (or dropped at their answer)
        self._waiting: deque = deque()
        self._owner = owner
        self._shared = shared
        self._told_routing = False

    @property
    def in_flight(self) -> int:
        """Steps sent and not yet answered (abandoned ones too: the server will still answer them)."""
        return len(self._waiting)

    def holds(self, number: int) -> bool:
        """Whether the `number`-th request sent here is still unanswered on a stream that takes more."""
        return self.open and self.answered < number

    def _expect(self, answer: Any) -> None:
        """A request goes out: its answer will be the one after those of every request sent before it."""
        self._waiting.append(answer)
        self.sent += 1

    def _routing(self, initial_metadata: Any) -> None:
        """Tell the owner, at the first answer, whether the server routes sessions by id."""
        if not self._told_routing:
            self._told_routing = True
            self._owner.routed(_routes_by_session(initial_metadata))

    def _hand_out(self, response: pb.StepResponse) -> None:
        """The next answer to the oldest step; dropped if its caller stopped waiting (deadline, cancelled)."""
        answer = self._waiting.popleft()
        self.answered += 1
        if not answer.done():
            with contextlib.suppress(InvalidStateError, asyncio.InvalidStateError):  # cancelled just now
                answer.set_result(response)
        if self._shared and not self._waiting:
            self._owner.idle(self)

    def _fail_waiting(self, error: RnnserveError) -> None:
        """Every step the stream carries and did not answer fails with `error` (it takes no new ones by now)."""
        self._owner.ended(self)
        waiting, self._waiting = self._waiting, deque()
        for answer in waiting:
            if not answer.done():
                with contextlib.suppress(InvalidStateError, asyncio.InvalidStateError):
                    answer.set_exception(error)


class _StepStream(_Answers):
    """One Stream call of the sync client: callers' threads send, a reader thread hands each answer to its step."""

    def __init__(self, stub: Any, metadata: tuple, owner: _Streams, shared: bool):
        super().__init__(owner, shared)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # a request and its place among the waiting are taken together
        self._call = stub.Stream(iter(self._requests.get, _END_OF_REQUESTS), metadata=metadata)
        threading.Thread(target=self._read, name="rnnserve-client-stream", daemon=True).start()

    def send(self, request: pb.StepRequest) -> Future | None:
        """The future of the request's answer; None when the stream takes no more requests."""
        answer: Future = Future()
        with self._lock:
            if not self.open:
                return None
            self._expect(answer)
            self._requests.put(request)
        return answer

    def retire(self) -> None:
        """Take no more requests; the server ends the call once it has answered the ones sent."""
        with self._lock:
            if self.open:
                self.open = False
                self._requests.put(_END_OF_REQUESTS)

    close = retire  # the client is closing: its channel closes after

    def _read(self) -> None:
        error = _ended()
        try:
            for response in self._call:
                if not self._told_routing:
                    self._routing(self._call.initial_metadata())
                self._hand_out(response)
        except grpc.RpcError as failure:
            error = _broken(failure)
        self.retire()
        with self._lock:
            self._fail_waiting(error)


class StepStreams(_Streams[_StepStream]):
    """The sync client's streams for `Session.step`."""

    def __init__(self, connection: Connection, stub: Any):
        super().__init__(connection, lambda metadata, owner, shared: _StepStream(stub, metadata, owner, shared))

    def step(self, request: pb.StepRequest, timeout: float | None, retry_safe: bool) -> pb.StepResponse:
        """The step's answer; retried as `Client._unary` retries a unary Step."""
        timeout = self._timeout(timeout)
        for attempt in itertools.count():
            stream, answer = self._send(request)
            try:
                try:
                    return _checked(answer.result(timeout))
                except FutureTimeout:
                    answer.cancel()
                    raise _deadline_exceeded() from None
            except RnnserveError as error:
                self._failed(stream, error)
                time.sleep(self._connection.retry.backoff(attempt, error, retry_safe))


class _AsyncStepStream(_Answers):
    """One Stream call of the asyncio client: requests written in order as callers send them, a reader task
    handing each answer to its step.

    A caller never awaits the call's own write or read: cancelling a task that awaits one of them cancels the
    whole call, and with it the other sessions' steps it carries. A writer task started when a request finds
    the stream idle writes what is queued and ends (an asyncio.Queue read by a request iterator, as before,
    woke two tasks per request; driving grpc's write coroutine from callbacks, without a task, measured no
    less CPU than this).
    """

    def __init__(self, stub: Any, metadata: tuple, owner: _Streams, shared: bool):
        super().__init__(owner, shared)
        self._unsent: deque[pb.StepRequest] = deque()
        self._writer: asyncio.Future | None = None  # the task writing `_unsent`, while there is something to write
        self._written = False  # the end of the requests was sent, or a write failed: nothing more goes out
        self._call = stub.Stream(metadata=metadata)
        self._reader = asyncio.ensure_future(self._read())

    def send(self, request: pb.StepRequest) -> asyncio.Future | None:
        """The future of the request's answer; None when the stream takes no more requests."""
        if not self.open:
            return None
        answer = asyncio.get_running_loop().create_future()
        self._expect(answer)
        self._unsent.append(request)
        self._write_next()
        return answer

    def retire(self) -> None:
        """Take no more requests; the server ends the call once it has answered the ones sent."""
        if self.open:
            self.open = False
            self._write_next()

    def close(self) -> None:
        """The client is closing: the call is cancelled, as its channel's close would cancel it."""
        self.open = False
        self._call.cancel()

    def _write_next(self) -> None:
        """Start the writer unless it is running: it writes the queued requests and, once the stream is retired
        and has sent them all, the end of the requests."""
        if self._writer is None and not self._written and (self._unsent or not self.open):
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        """Write what is queued, in order, then end. A write that fails means the call ended: the reader then
        fails every step still waiting."""
        try:
            while not self._written and (self._unsent or not self.open):
                if self._unsent:
                    await self._call.write(self._unsent.popleft())
                else:
                    self._written = True
                    await self._call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError, asyncio.CancelledError):
            self._written = True
            self._unsent.clear()
        finally:
            self._writer = None

    async def _read(self) -> None:
        error = _ended()
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:
                if not self._told_routing:
                    self._routing(await self._call.initial_metadata())
                self._hand_out(response)
        except grpc.RpcError as failure:
            error = _broken(failure)
        except asyncio.CancelledError:  # the channel closed under it
            error = RnnserveError(grpc.StatusCode.CANCELLED, "the client was closed")
        finally:
            self.retire()
            self._fail_waiting(error)


def _expire(answer: asyncio.Future) -> None:
    """The step's deadline passed: its caller stops waiting (the answer, if one comes, is dropped)."""
    if not answer.done():
        answer.set_exception(_deadline_exceeded())


class AsyncStepStreams(_Streams[_AsyncStepStream]):
    """The asyncio client's streams for `AsyncSession.step`."""

    def __init__(self, connection: Connection, stub: Any):
        super().__init__(connection, lambda metadata, owner, shared: _AsyncStepStream(stub, metadata, owner, shared))

    async def step(self, request: pb.StepRequest, timeout: float | None, retry_safe: bool) -> pb.StepResponse:
        """The step's answer; retried as `AsyncClient._unary` retries a unary Step.

        The deadline is a timer that fails the answer's future itself, so that the caller wakes once per step
        (asyncio.wait_for would add a future and a wake-up of its own).
        """
        timeout = self._timeout(timeout)
        loop = asyncio.get_running_loop()
        for attempt in itertools.count():
            stream, answer = self._send(request)
            expiry = None if timeout is None else loop.call_later(timeout, _expire, answer)
            try:
                try:
                    return _checked(await answer)
                finally:
                    if expiry is not None:
                        expiry.cancel()
            except RnnserveError as error:
                self._failed(stream, error)
                await asyncio.sleep(self._connection.retry.backoff(attempt, error, retry_safe))
