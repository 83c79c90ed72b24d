"""Our services registered taking bytes, so that a request that does not parse is INVALID_ARGUMENT.

grpc parses a request before the handler runs, outside the handler's error mapping (`guard`): a
message that is not valid protobuf (a corrupt wire format, a string field holding invalid UTF-8)
would be answered UNKNOWN for a unary call and INTERNAL from inside a request stream, although
it is the caller's mistake. So every method is registered with raw bytes in, and `Parsed` parses
each request inside the handler, where it fails like any other caller's mistake.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from rnnserve.server.core.errors import InvalidArgument
from rnnserve.v1 import rnnserve_pb2

SERVICE = rnnserve_pb2.DESCRIPTOR.services_by_name["Inference"]
ADMIN_SERVICE = rnnserve_pb2.DESCRIPTOR.services_by_name["Admin"]

_HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                  (False, True): grpc.unary_stream_rpc_method_handler,
                  (True, False): grpc.stream_unary_rpc_method_handler,
                  (True, True): grpc.stream_stream_rpc_method_handler}


def method_handler(behavior: Callable, request_streaming: bool, response_streaming: bool,
                   **serializers: Callable) -> grpc.RpcMethodHandler:
    """A grpc method handler of the given kind (unary or streaming requests and responses) for `behavior`."""
    return _HANDLER_KINDS[request_streaming, response_streaming](behavior, **serializers)


def _parser(method: MethodDescriptor) -> Callable[[bytes], Message]:
    message_class = GetMessageClass(method.input_type)

    def parse(raw: bytes) -> Message:
        try:
            return message_class.FromString(raw)
        except DecodeError as error:
            raise InvalidArgument("request", str(error)) from None  # names the message type and what is wrong

    return parse


def _parsing(method: MethodDescriptor, handler: Callable) -> Callable:
    """`handler`, taking its request, or its stream of requests, as bytes; a streaming handler stays a generator."""
    parse = _parser(method)

    def parsed(request: bytes | AsyncIterator[bytes]) -> Message | AsyncIterator[Message]:
        return (parse(raw) async for raw in request) if method.client_streaming else parse(request)

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def parsing_stream(request, context: grpc.aio.ServicerContext):
            async for response in handler(parsed(request), context):
                yield response

        return parsing_stream

    @functools.wraps(handler)
    async def parsing(request, context: grpc.aio.ServicerContext):
        return await handler(parsed(request), context)

    return parsing


class Parsed:
    """The servicer's methods, each parsing its requests from bytes first."""

    def __init__(self, servicer: object, service: ServiceDescriptor = SERVICE):
        self._servicer = servicer
        self._service = service

    def __getattr__(self, name: str) -> Callable:
        return _parsing(self._service.methods_by_name[name], getattr(self._servicer, name))


def add_to_server(servicer: object, server: grpc.aio.Server, service: ServiceDescriptor = SERVICE) -> None:
    """Register `servicer`, whose methods take bytes (a guarded `Parsed`), as `service`."""
    handlers = {}
    for method in service.methods:
        handlers[method.name] = method_handler(
            getattr(servicer, method.name), method.client_streaming, method.server_streaming,
            response_serializer=GetMessageClass(method.output_type).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
