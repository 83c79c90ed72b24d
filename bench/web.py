"""The HTTP face under the same closed loops: W2 over HTTP/JSON at 1 and 64 sessions, and the time to
first token of a Generate streamed as server-sent events, beside the same Generate over gRPC.

The load generator speaks HTTP/1.1 itself over asyncio streams, one keep-alive connection per
session, as it drives gRPC with raw stubs: a client library's own CPU would be charged to the face
on this 2-core machine. Sessions are opened over gRPC (anonymous callers are one identity on both
faces), so that the HTTP loop times steps alone.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence

from rnnserve.v1 import rnnserve_pb2

from bench.load import Endpoint, Feed, RoundTrip, StepFailed, closed_loop, connect, one_token_at_a_time
from bench.processes import ServerProcess
from bench.sizes import Sizes
from bench.stats import Results, Timed, p50
from bench.workloads import close_sessions, create_sessions, sessions

HTTP_SESSIONS = (1, 64)
TTFT_PROMPT_TOKENS = 100  # a prompt of this many tokens is read before the first token is chosen
TTFT_MAX_TOKENS = 16
HTTP_PORT_LINE = re.compile(r"HTTP/JSON and the playground on \S+, port (\d+)")  # rnnserve-server's log


def http_port(process: ServerProcess) -> int:
    return process.announced_port(HTTP_PORT_LINE, "an HTTP port")


class Connection:
    """One keep-alive HTTP/1.1 connection, posting JSON and reading the answers uvicorn sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def _send(self, path: str, body: bytes, accept: bytes) -> bytes:
        """Post `body`; the answer's head, once a 200 starts."""
        self._writer.write(b"POST %s HTTP/1.1\r\nhost: bench\r\naccept: %s\r\ncontent-type: application/json\r\n"
                           b"content-length: %d\r\n\r\n%s" % (path.encode(), accept, len(body), body))
        head = await self._reader.readuntil(b"\r\n\r\n")
        if head[9:12] != b"200":
            raise StepFailed(f"POST {path}: {head[9:12].decode()} {await self._rest(head)!r}")
        return head

    async def _rest(self, head: bytes) -> bytes:
        length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
        return await self._reader.readexactly(int(length.group(1))) if length else b""

    async def post(self, path: str, body: bytes) -> bytes:
        return await self._rest(await self._send(path, body, b"application/json"))

    async def first_event(self, path: str, body: bytes) -> float:
        """Post for server-sent events: seconds to the first event; reads the stream to its end."""
        started = time.perf_counter()
        await self._send(path, body, b"text/event-stream")
        first = None
        while True:  # chunked: a size line in hex, the data, CRLF; size 0 ends it
            size = int((await self._reader.readuntil(b"\r\n")).strip(), 16)
            data = await self._reader.readexactly(size + 2)
            if size == 0:
                return first
            if first is None and b"data: " in data:
                first = time.perf_counter() - started

    def close(self) -> None:
        self._writer.close()


def http_round_trip(connection: Connection, session_id: str, feed: Feed) -> RoundTrip:
    """One step as a POST of its JSON to /v1/sessions/{id}/step."""
    path = f"/v1/sessions/{session_id}/step"

    async def round_trip() -> None:
        await connection.post(path, b'{"token_ids":%s}' % json.dumps(list(next(feed))).encode())

    return round_trip


async def http_steps(server: Endpoint, port: int, count: int, steps: int, warmup: int,
                     tokens: Sequence[int]) -> Timed:
    """`count` sessions, each stepping over its own HTTP connection, closed loop."""
    async with sessions(server.stub, count) as ids:
        connections = [await Connection.open(port) for _ in ids]
        try:
            trips = [http_round_trip(c, i, one_token_at_a_time(tokens)) for c, i in zip(connections, ids)]
            return await closed_loop(trips, steps, warmup, server.pid)
        finally:
            for connection in connections:
                connection.close()


async def grpc_first_token(server: Endpoint, request: rnnserve_pb2.GenerateRequest) -> float:
    started, first = time.perf_counter(), None
    async for _ in server.stub.Generate(request):
        first = first or time.perf_counter() - started
    return first


async def time_to_first_token(server: Endpoint, port: int, repeats: int, prompt: Sequence[int],
                              results: Results) -> None:
    """Generate after a prompt, over SSE and over gRPC in alternation, each on a new session; medians."""
    connection = await Connection.open(port)
    seconds: dict[str, list[float]] = {"sse": [], "grpc": []}
    try:
        for repeat in range(repeats + 1):  # the first of each is a warm-up
            for variant in seconds:
                [session_id] = await create_sessions(server.stub, 1)
                if variant == "sse":
                    body = json.dumps({"token_ids": list(prompt), "max_tokens": TTFT_MAX_TOKENS}).encode()
                    first = await connection.first_event(f"/v1/sessions/{session_id}/generate", body)
                else:
                    first = await grpc_first_token(server, rnnserve_pb2.GenerateRequest(
                        session_id=session_id, token_ids=prompt, max_tokens=TTFT_MAX_TOKENS))
                await close_sessions(server.stub, [session_id])
                if repeat:
                    seconds[variant].append(first * 1e6)
    finally:
        connection.close()
    for variant, latencies in seconds.items():
        results.add("TTFT", variant, 1, "p50_us", p50(latencies), "us")


async def web(process: ServerProcess, sizes: Sizes, tokens: Sequence[int], results: Results) -> None:
    """W2 over HTTP at 1 and 64 sessions, and time to first token over SSE and gRPC, on `process`."""
    port = http_port(process)
    async with connect(process) as server:
        for count in HTTP_SESSIONS:
            results.add_loop("W2", "http", count,
                             await http_steps(server, port, count, sizes.w2_steps, sizes.warmup_steps, tokens))
        await time_to_first_token(server, port, sizes.prefill_repeats, tokens[:TTFT_PROMPT_TOKENS], results)
