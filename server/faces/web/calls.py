"""A route's RPC run on the very servicer object that grpc calls, with a stand-in for grpc's context.

The servicer reads three things of a call: who calls (`auth.caller`, through `peer_identities`),
its deadline (`time_remaining`), and, for a stream, `write`; grpc's health servicer also ends
calls with `abort`. `HttpContext` gives exactly those, so HTTP runs the gRPC handlers themselves
and no behaviour exists twice. Requests and responses are protobuf messages in protobuf's JSON
mapping (field names as in the .proto).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import status_pb2
from starlette.requests import Request

from rnnserve.server.core.errors import InvalidArgument, to_status
from rnnserve.server.faces.web import request_json
from rnnserve.server.faces.web.routes import Route

Write = Callable[[Message], Awaitable[None]]
TIMEOUT_HEADER = "x-server-timeout"


class Aborted(Exception):
    """A call ended with a status of its own (grpc's health servicer aborts; a missing token)."""

    def __init__(self, status: status_pb2.Status):
        super().__init__(status.message)
        self.status = status


def status_of(error: BaseException) -> status_pb2.Status:
    """What the caller receives for `error`: `errors.to_status`, the one mapping gRPC uses too."""
    return error.status if isinstance(error, Aborted) else to_status(error)


class HttpContext:
    """What an HTTP call gives the servicer in place of grpc.aio.ServicerContext."""

    def __init__(self, identities: list[bytes] | None, write: Write | None = None, deadline: float | None = None):
        """`deadline`: a time.monotonic() instant (from `deadline_of`), None for none."""
        self._identities = identities
        self._write = write
        self.deadline = deadline

    def peer_identities(self) -> list[bytes] | None:
        """The caller's identity, the token's name or the client certificate's, as `auth.caller` reads it."""
        return self._identities

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def write(self, message: Message) -> None:
        await self._write(message)

    async def send_initial_metadata(self, metadata: object) -> None:
        """Nothing: gRPC metadata (how the rnnserve client should route a Stream) means nothing to HTTP."""

    @staticmethod
    async def abort(code: grpc.StatusCode, details: str = "", *_: object) -> None:
        raise Aborted(status_pb2.Status(code=code.value[0], message=details or code.name))


def to_json(message: Message) -> dict:
    """A message in protobuf's JSON mapping, with .proto field names and every field shown, zeros included."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def parse(route: Route, body: object, path_params: Mapping[str, str]) -> Message | list[Message]:
    """The route's request (a list of them for a client-streaming method) from a decoded JSON body."""
    message_class = GetMessageClass(route.method.input_type)
    if route.method.client_streaming:
        if not isinstance(body, list):
            raise InvalidArgument("request", f"a JSON array of {route.method.input_type.name} messages")
        return [_parse_one(message_class, item, {}) for item in body]
    if not isinstance(body, dict):
        raise InvalidArgument("request", f"a JSON object: the {route.method.input_type.name} message")
    return _parse_one(message_class, body, {**path_params, **route.fixed})


def _parse_one(message_class: type[Message], body: object, fields: Mapping[str, object]) -> Message:
    if not isinstance(body, dict):
        raise InvalidArgument("request", f"each request is a JSON object: a {message_class.DESCRIPTOR.name}")
    for name, value in fields.items():
        if name in body and body[name] != value:
            raise InvalidArgument(name, f"the path gives {value!r}; the body may repeat it but not differ")
    return request_json.parse(message_class, {**body, **fields})


def deadline_of(request: Request) -> float | None:
    """The call's deadline from its X-Server-Timeout header (seconds, as Google's HTTP/JSON gateways
    take it) as a time.monotonic() instant; None without the header."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise InvalidArgument(TIMEOUT_HEADER, "seconds to the call's deadline: a positive number")
    return time.monotonic() + seconds


async def run(handler: Callable, request: Message | list[Message], context: HttpContext) -> Message | None:
    """`call` within the context's deadline, if it has one: past it, the call is cancelled, as grpc
    cancels a call at its deadline, and answers DEADLINE_EXCEEDED."""
    if context.deadline is None:
        return await call(handler, request, context)
    task = asyncio.ensure_future(call(handler, request, context))
    try:
        done, _ = await asyncio.wait((task,), timeout=context.time_remaining())
    except asyncio.CancelledError:  # this request itself is cancelled: the caller went away
        task.cancel()
        raise
    if not done:
        task.cancel()
        await asyncio.wait((task,))
    if task.cancelled():  # by the deadline, here or where the engine drops a step that waited past it
        raise Aborted(status_pb2.Status(code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0], message="Deadline Exceeded"))
    return task.result()


async def call(handler: Callable, request: Message | list[Message], context: HttpContext) -> Message | None:
    """Call a servicer method as grpc would: a request stream as an async iterator, and the responses
    of an async-generator method written to the context."""
    if isinstance(request, list):
        request = _stream(request)
    if inspect.isasyncgenfunction(handler):
        async for response in handler(request, context):
            await context.write(response)
        return None
    return await handler(request, context)


async def _stream(requests: list[Message]) -> AsyncIterator[Message]:
    for request in requests:
        yield request


async def raw_body(request: Request, max_bytes: int) -> bytes:
    """The body, read up to `max_bytes` and no further."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise InvalidArgument("request", f"the body is larger than {max_bytes} bytes, the server's "
                                             f"--max-message-bytes")
    return bytes(raw)


async def json_body(request: Request, max_bytes: int) -> object:
    """The decoded body, read up to `max_bytes` and no further; None for an empty one (every field at its default)."""
    raw = await raw_body(request, max_bytes)
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as error:
        raise InvalidArgument("request", f"the body is not JSON: {error}") from None
