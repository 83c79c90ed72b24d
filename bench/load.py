"""The load generator: closed loops over raw grpc.aio stubs, all on one event loop.

The load generator shares the two cores with the server, so it is kept as cheap as Python
allows: generated stubs rather than the client library (no retries, no wrappers), one channel,
one coroutine per session. The same loop drives the echo floor (F2) and the live server (W1-W3),
so the two differ only in what answers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from rnnserve.client import AsyncSession
from rnnserve.v1 import rnnserve_pb2, rnnserve_pb2_grpc

from bench.processes import ServerProcess, cpu_seconds
from bench.stats import Timed

# One round trip: send one request and wait for its answer. What it feeds comes from an iterator
# of token lists the round trip owns: one token per step, or a whole prompt for a prefill.
RoundTrip = Callable[[], Awaitable[None]]
Feed = Iterator[Sequence[int]]


@dataclass(frozen=True)
class Endpoint:
    """A server under load: the stub that reaches it, and its process, whose CPU time is counted."""

    stub: rnnserve_pb2_grpc.InferenceStub
    pid: int
    address: str  # for a client of its own (rnnserve.client's, measured beside the raw stubs)


@asynccontextmanager
async def connect(server: ServerProcess) -> AsyncIterator[Endpoint]:
    """One channel to `server` for everything the load generator sends it."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield Endpoint(rnnserve_pb2_grpc.InferenceStub(channel), server.pid, server.address)


class StepFailed(RuntimeError):
    """The server answered a step with an error: a benchmark of failures would measure nothing."""


def check(response: rnnserve_pb2.StepResponse) -> None:
    if response.HasField("error"):
        raise StepFailed(f"session {response.session_id}: code {response.error.code}: {response.error.message}")


def step_request(session_id: str, token_ids: Sequence[int]) -> rnnserve_pb2.StepRequest:
    return rnnserve_pb2.StepRequest(session_id=session_id, token_ids=token_ids)


def one_token_at_a_time(tokens: Sequence[int]) -> Feed:
    """The feed of a closed loop of single steps: `tokens` one by one, round and round."""
    return ([token] for token in itertools.cycle(tokens))


def stream_round_trip(call: grpc.aio.StreamStreamCall, session_id: str, feed: Feed) -> RoundTrip:
    """One step over a session's own bidirectional stream: write, then read its answer."""

    async def round_trip() -> None:
        await call.write(step_request(session_id, next(feed)))
        response = await call.read()
        if response is grpc.aio.EOF:
            raise StepFailed(f"session {session_id}: stream ended early ({await call.code()})")
        check(response)

    return round_trip


def unary_round_trip(stub: rnnserve_pb2_grpc.InferenceStub, session_id: str, feed: Feed) -> RoundTrip:
    """One step as its own Step call."""

    async def round_trip() -> None:
        check(await stub.Step(step_request(session_id, next(feed))))

    return round_trip


def client_round_trip(session: AsyncSession, feed: Feed) -> RoundTrip:
    """One step through rnnserve.client, as a service makes it: `session.step()`, its answer a Prediction."""

    async def round_trip() -> None:
        await session.step(next(feed))

    return round_trip


def batch_round_trip(stub: rnnserve_pb2_grpc.InferenceStub, session_ids: Sequence[str], feed: Feed) -> RoundTrip:
    """One step for every session in one StepBatch message, all fed the same tokens."""

    async def round_trip() -> None:
        token_ids = next(feed)
        request = rnnserve_pb2.StepBatchRequest()
        for session_id in session_ids:  # built in place: a list of StepRequests would be copied in again
            request.steps.add(session_id=session_id, token_ids=token_ids)
        for result in (await stub.StepBatch(request)).results:
            check(result)

    return round_trip


@asynccontextmanager
async def open_streams(stub: rnnserve_pb2_grpc.InferenceStub,
                       count: int) -> AsyncIterator[list[grpc.aio.StreamStreamCall]]:
    """`count` Stream calls: half-closed and checked for a clean end after the block, cancelled if it fails."""
    calls = [stub.Stream() for _ in range(count)]
    try:
        yield calls
    except BaseException:
        for call in calls:
            call.cancel()
        raise
    await asyncio.gather(*(call.done_writing() for call in calls))
    codes = await asyncio.gather(*(call.code() for call in calls))
    if any(code != grpc.StatusCode.OK for code in codes):
        raise StepFailed(f"streams ended with {sorted({c.name for c in codes})}")


async def time_us(round_trip: RoundTrip) -> float:
    """One round trip's latency in microseconds."""
    start = time.perf_counter_ns()
    await round_trip()
    return (time.perf_counter_ns() - start) / 1e3


async def closed_loop(round_trips: Sequence[RoundTrip], steps: int, warmup: int, server_pid: int,
                      tokens_per_trip: int = 1) -> Timed:
    """Every round trip `steps` times concurrently, each waiting for its previous answer.

    `warmup` untimed trips each come first, so that stream setup, the server's first batches and
    lazy allocations stay out of the figures. The wall time runs from the first timed send to
    the last answer; latencies are in microseconds, in completion order (in step order for one
    round trip). CPU time is counted for this process and for the server at `server_pid`.
    """

    async def drive(round_trip: RoundTrip, count: int, latencies: list[float]) -> None:
        for _ in range(count):
            latencies.append(await time_us(round_trip))

    await asyncio.gather(*(drive(r, warmup, []) for r in round_trips))
    latencies: list[float] = []
    client_cpu, server_cpu, start = time.process_time(), cpu_seconds(server_pid), time.perf_counter()
    await asyncio.gather(*(drive(r, steps, latencies) for r in round_trips))
    return Timed(time.perf_counter() - start, steps * len(round_trips) * tokens_per_trip, latencies,
                 time.process_time() - client_cpu, cpu_seconds(server_pid) - server_cpu)
