"""W1-W5 of ../shared/WORKLOAD.md against a live rnnserve server.

Each workload opens the sessions it needs and closes them again, so that one server process
serves W1-W4 in turn without one workload's sessions weighing on the next. W5 wants a server
that has never held a session (its baseline), so it gets a process of its own.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager

from rnnserve.client import AsyncClient
from rnnserve.v1 import rnnserve_pb2, rnnserve_pb2_grpc

from bench.load import (Endpoint, RoundTrip, batch_round_trip, client_round_trip, closed_loop, connect,
                        one_token_at_a_time, open_streams, stream_round_trip, unary_round_trip)
from bench.processes import ServerProcess
from bench.sizes import Sizes
from bench.stats import Results, Rounds, Timed, p50

# The server of W1-W4 keeps no prefix-state cache, so that W3's stateless baseline reads every prefix whole;
# W1, W2 and W4 send no prompt, which is all the cache serves.
W1_TO_W4_FLAGS = ["--prefix-cache-entries", "0"]
# Sessions are opened and closed this many calls at a time: enough to keep the server busy,
# few enough that 100,000 creations never pile up as 100,000 pending calls.
WAVE = 256


async def create_sessions(stub: rnnserve_pb2_grpc.InferenceStub, count: int,
                          prompt: Sequence[int] = (), model: str = "") -> list[str]:
    """`count` new sessions of `model` (the server's default if ""), each fed `prompt` if one is given; their ids."""
    request = rnnserve_pb2.CreateSessionRequest(prompt_token_ids=prompt, model=model)
    ids: list[str] = []
    for start in range(0, count, WAVE):
        created = await asyncio.gather(*(stub.CreateSession(request) for _ in range(min(WAVE, count - start))))
        ids += [response.session.session_id for response in created]
    return ids


async def close_sessions(stub: rnnserve_pb2_grpc.InferenceStub, ids: Sequence[str]) -> None:
    for start in range(0, len(ids), WAVE):
        await asyncio.gather(*(stub.CloseSession(rnnserve_pb2.CloseSessionRequest(session_id=i))
                               for i in ids[start:start + WAVE]))


@asynccontextmanager
async def sessions(stub: rnnserve_pb2_grpc.InferenceStub, count: int,
                   prompt: Sequence[int] = (), model: str = "") -> AsyncIterator[list[str]]:
    ids = await create_sessions(stub, count, prompt, model)
    try:
        yield ids
    finally:
        await close_sessions(stub, ids)


async def stream_steps(server: Endpoint, count: int, steps: int, warmup: int, tokens: Sequence[int]) -> Timed:
    """`count` sessions, each stepping over its own stream, closed loop."""
    async with sessions(server.stub, count) as ids, open_streams(server.stub, count) as calls:
        trips = [stream_round_trip(call, i, one_token_at_a_time(tokens)) for call, i in zip(calls, ids)]
        return await closed_loop(trips, steps, warmup, server.pid)


async def unary_steps(server: Endpoint, count: int, steps: int, warmup: int, tokens: Sequence[int]) -> Timed:
    """`count` sessions, each stepping with a Step call per step, closed loop."""
    async with sessions(server.stub, count) as ids:
        trips = [unary_round_trip(server.stub, i, one_token_at_a_time(tokens)) for i in ids]
        return await closed_loop(trips, steps, warmup, server.pid)


async def client_steps(server: Endpoint, count: int, steps: int, warmup: int, tokens: Sequence[int],
                       unary: bool = False) -> Timed:
    """`count` sessions of rnnserve.client, each stepping with `session.step()`, closed loop: over the Stream
    calls the client shares among its sessions, or with `unary` a Step call each. Its client CPU per token is
    what the client library costs a service, read beside the raw stubs' of the stream and unary loops."""
    async with AsyncClient(server.address, unary=unary) as client:
        opened = [await client.session() for _ in range(count)]
        try:
            trips = [client_round_trip(session, one_token_at_a_time(tokens)) for session in opened]
            return await closed_loop(trips, steps, warmup, server.pid)
        finally:
            await asyncio.gather(*(session.close() for session in opened))


async def batch_steps(server: Endpoint, count: int, steps: int, warmup: int, tokens: Sequence[int],
                      in_flight: int = 1) -> Timed:
    """`count` sessions stepped in StepBatch messages, closed loop: split into `in_flight` equal groups,
    each a message per step, so that `in_flight` messages are in flight at once (as a gateway that
    pipelines keeps them, so that its own work on one overlaps the model's on another)."""
    size = count // in_flight
    async with sessions(server.stub, size * in_flight) as ids:
        trips = [batch_round_trip(server.stub, ids[start:start + size], one_token_at_a_time(tokens))
                 for start in range(0, len(ids), size)]
        return await closed_loop(trips, steps, warmup, server.pid, size)


async def headline(server: Endpoint, sizes: Sizes, tokens: Sequence[int], rounds: Rounds) -> None:
    """The loops the targets read, measured in rounds spread over the run: W1 (one session, a step at a
    time over its stream); W2 at every session count a stream each, a Step call each, and rnnserve.client's
    `session.step()` (shared streams); and at the most sessions rnnserve.client with a Step call each, all
    in one StepBatch, and in two StepBatch messages in flight."""
    rounds.add("W1", "stream", 1, await stream_steps(server, 1, sizes.w1_steps, sizes.warmup_steps, tokens))
    count, steps, warmup = sizes.most_sessions, sizes.w2_steps, sizes.warmup_steps
    for sessions_count in sizes.batches:
        rounds.add("W2", "stream", sessions_count, await stream_steps(server, sessions_count, steps, warmup, tokens))
        rounds.add("W2", "unary", sessions_count, await unary_steps(server, sessions_count, steps, warmup, tokens))
        rounds.add("W2", "client", sessions_count, await client_steps(server, sessions_count, steps, warmup, tokens))
    rounds.add("W2", "client-unary", count, await client_steps(server, count, steps, warmup, tokens, unary=True))
    rounds.add("W2", "multi", count, await batch_steps(server, count, steps, warmup, tokens))
    rounds.add("W2", "multi-2", count, await batch_steps(server, count, steps, warmup, tokens, in_flight=2))


def create_round_trip(stub: rnnserve_pb2_grpc.InferenceStub, prompts: Iterator[Sequence[int]], cached: int,
                      opened: list[str]) -> RoundTrip:
    """A new session fed the next of `prompts`, up to its first prediction (W3's stateless step, W6).

    Refused unless `cached` of its tokens came from the prefix-state cache: a prompt that missed,
    or hit, unseen would measure the wrong thing. The session is closed only after the loop (its
    id goes to `opened`), so that the timed call is the creation alone.
    """

    async def round_trip() -> None:
        created = await stub.CreateSession(rnnserve_pb2.CreateSessionRequest(prompt_token_ids=next(prompts)))
        opened.append(created.session.session_id)
        if created.cached_prompt_tokens != cached:
            raise RuntimeError(f"{created.cached_prompt_tokens} prompt tokens came from the cache, not {cached}")

    return round_trip


async def w3(server: Endpoint, sizes: Sizes, tokens: Sequence[int], results: Results) -> None:
    """Long sessions: the first and the last window of a long session, stateful and stateless.

    The stateless baseline runs only the two windows: steps between them change nothing for a
    server that keeps no state, and re-running every prefix of 2,000 tokens would take minutes.
    No warm-up: positions must start at 1, and a median over the window absorbs the first step.
    A stateless step is a new session fed the whole prefix, on a server without the prefix-state
    cache (W1_TO_W4_FLAGS), which would have it read only the token after the previous prefix.
    """
    window, steps = sizes.w3_window, sizes.w3_steps
    stateful = (await stream_steps(server, 1, steps, 0, tokens)).latencies_us
    lengths = [*range(1, window + 1), *range(steps - window + 1, steps + 1)]
    opened: list[str] = []
    trip = create_round_trip(server.stub, (tokens[:n] for n in lengths), 0, opened)
    stateless = (await closed_loop([trip], len(lengths), 0, server.pid)).latencies_us
    await close_sessions(server.stub, opened)
    for variant, latencies in (("stateful", stateful), ("stateless", stateless)):
        first, last = p50(latencies[:window]), p50(latencies[-window:])
        results.add("W3", variant, 1, "first100_p50_us", first, "us")
        results.add("W3", variant, 1, "last100_p50_us", last, "us")
        results.add("W3", variant, 1, "last_first_ratio", last / first, "ratio")


async def w4(server: Endpoint, sizes: Sizes, tokens: Sequence[int], results: Results) -> None:
    """Prefill: a whole prompt in one Step; tokens/s from the median call, as F1's prefill."""
    async with sessions(server.stub, 1) as [session_id]:
        trip = unary_round_trip(server.stub, session_id, itertools.repeat(tokens[:sizes.prefill_tokens]))
        timed = await closed_loop([trip], sizes.prefill_repeats, 1, server.pid)
    median = p50(timed.latencies_us)
    results.add("W4", "prefill", 1, "p50_us", median, "us")
    results.add("W4", "prefill", 1, "tokens_per_s", sizes.prefill_tokens / median * 1e6, "tokens/s")


async def w1_to_w4(process: ServerProcess, sizes: Sizes, tokens: Sequence[int], results: Results, rounds: Rounds,
                   progress: Callable[[str], None]) -> None:
    """W1-W4 in turn over one channel, the first round of `headline` first."""
    async with connect(process) as server:
        progress(f"W1 latency and W2 at {sizes.most_sessions} sessions, round 1 of {sizes.headline_rounds}")
        await headline(server, sizes, tokens, rounds)
        for name, workload in (("W3 long sessions", w3), ("W4 prefill", w4)):
            progress(name)
            await workload(server, sizes, tokens, results)


async def headline_round(process: ServerProcess, sizes: Sizes, tokens: Sequence[int], rounds: Rounds) -> None:
    """A later round of `headline`, on a server of its own."""
    async with connect(process) as server:
        await headline(server, sizes, tokens, rounds)


async def w5(process: ServerProcess, sizes: Sizes, tokens: Sequence[int], state_bytes: int, results: Results) -> None:
    """Memory: the server's resident memory holding many idle sessions, against their raw state bytes.

    Every session reads a one-token prompt first: a session that never ran holds zero state,
    which a pool of untouched zero pages would hold for free. The baseline is taken after one
    such session has come and gone, so that onnxruntime's lazy allocations count as baseline.
    """
    count = sizes.w5_sessions
    async with connect(process) as server:
        await close_sessions(server.stub, await create_sessions(server.stub, 1, tokens[:1]))
        baseline = process.rss_bytes()
        await create_sessions(server.stub, count, tokens[:1])
        rss = process.rss_bytes()
    results.add("W5", "idle", count, "rss_bytes", rss, "bytes")
    results.add("W5", "idle", count, "baseline_rss_bytes", baseline, "bytes")
    results.add("W5", "idle", count, "raw_state_bytes", count * state_bytes, "bytes")
    results.add("W5", "idle", count, "bytes_per_session", (rss - baseline) / count, "bytes")
