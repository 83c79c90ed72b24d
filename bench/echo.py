"""F2's and F2u's bare server: the rnnserve Stream and Step methods answered by an echo, with zero model work.

It speaks the project's own StepRequest and StepResponse through a generic handler, so the
messages on the wire are the size the real server's are (a session id and a token in; 5 ids and
5 probabilities out) and the load generator drives it with the very stub it points at the server.
What it sustains is what a Python grpc.aio server can do on this machine at best, on the event
loop the server under test runs on (`--event-loop`): over streams (F2), and a call per step (F2u).

Run as its own process: `python bench/echo.py --listen 127.0.0.1:0` prints the port it bound.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import grpc
from rnnserve.server import event_loop
from rnnserve.v1 import rnnserve_pb2

# A fixed top-5 answer: what the real server computes, here without computing it.
PREDICTION = rnnserve_pb2.Prediction(token_ids=[1, 2, 3, 4, 5], probabilities=[0.4, 0.3, 0.15, 0.1, 0.05])


async def echo_stream(requests: AsyncIterator[rnnserve_pb2.StepRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[rnnserve_pb2.StepResponse]:
    """One answer per step, in order, as the real Stream answers."""
    position = 0
    async for request in requests:
        position += len(request.token_ids)
        yield rnnserve_pb2.StepResponse(session_id=request.session_id, position=position, prediction=PREDICTION,
                                        request_id=request.request_id)


async def echo_step(request: rnnserve_pb2.StepRequest, context: grpc.aio.ServicerContext) -> rnnserve_pb2.StepResponse:
    """The same answer to a unary Step: what any Python grpc.aio server pays per call."""
    return rnnserve_pb2.StepResponse(session_id=request.session_id, position=len(request.token_ids),
                                     prediction=PREDICTION, request_id=request.request_id)


def echo_handler() -> grpc.GenericRpcHandler:
    messages = {"request_deserializer": rnnserve_pb2.StepRequest.FromString,
                "response_serializer": rnnserve_pb2.StepResponse.SerializeToString}
    return grpc.method_handlers_generic_handler("rnnserve.v1.Inference", {
        "Stream": grpc.stream_stream_rpc_method_handler(echo_stream, **messages),
        "Step": grpc.unary_unary_rpc_method_handler(echo_step, **messages)})


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((echo_handler(),))
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"serving the echo floor on {listen}, port {port}", flush=True)  # as rnnserve-server logs it
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/echo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="address to bind; port 0 picks a free one")
    parser.add_argument("--event-loop", choices=event_loop.EVENT_LOOPS, default=event_loop.DEFAULT_EVENT_LOOP,
                        help="the event loop to serve on, as rnnserve-server's flag of that name")
    args = parser.parse_args(argv)
    event_loop.run(serve(args.listen), args.event_loop)


if __name__ == "__main__":
    main()
