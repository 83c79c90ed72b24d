"""Issue 11's session operations: what each costs against a plain step, and W6, the prefix-state cache.

A recurrent session's past is a few KiB of state, so forking, rewinding, scoring and moving a
session should cost about a step, not a prefill: each operation is timed beside a unary Step of
the same session over the same channel, pair by pair, so that both meet the same moments of a
shared machine, and reported as its median against the step's. W6 compares a new session whose
1,000-token prompt is cached with one that must read it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rnnserve.v1 import rnnserve_pb2, rnnserve_pb2_grpc

from bench.load import Endpoint, Feed, RoundTrip, connect, one_token_at_a_time, time_us, unary_round_trip
from bench.processes import ServerProcess
from bench.sizes import Sizes
from bench.stats import Results, p50, p99
from bench.workloads import close_sessions, create_round_trip, create_sessions, sessions

SCORE_CANDIDATES, SCORE_TOKENS = 4, 20  # issue 11's score: 4 candidate continuations of 20 tokens each
COLD_PROMPT_SEED = 2  # W6's cold prompts; the reference tokens use seed 1


@dataclass(frozen=True)
class Operation:
    """A session operation as it is timed: its name in the rows, its call on a session, the tokens it undoes."""

    name: str
    run: Callable[[str], RoundTrip]  # the timed call(s) on the session of this id
    undoes: int = 0  # read again, untimed, after each time, so that a rewind always has tokens to undo


def tokens_at_a_time(tokens: Sequence[int], count: int) -> Feed:
    """`count` tokens per request from `tokens`, round and round (a prompt or a candidate of any length)."""
    cycle = itertools.cycle(tokens)
    return (list(itertools.islice(cycle, count)) for _ in itertools.count())


def operations(stub: rnnserve_pb2_grpc.InferenceStub, tokens: Sequence[int], depth: int,
               opened: list[str]) -> list[Operation]:
    """Fork (count 1), rewind of 1 token and of the depth, score of 4 candidates of 20 tokens, export plus import.

    Sessions that forks and imports make go to `opened`, closed after the loop, so that each timed
    call is the operation alone. Rewinds are left out when the server keeps nothing to rewind.
    """
    feed = tokens_at_a_time(tokens, SCORE_TOKENS)
    candidates = [rnnserve_pb2.Continuation(token_ids=next(feed)) for _ in range(SCORE_CANDIDATES)]

    def fork(session_id: str) -> RoundTrip:
        async def round_trip() -> None:
            forks = await stub.ForkSession(rnnserve_pb2.ForkSessionRequest(session_id=session_id, count=1))
            opened.extend(fork.session_id for fork in forks.sessions)
        return round_trip

    def rewind(count: int) -> Callable[[str], RoundTrip]:
        def on(session_id: str) -> RoundTrip:
            async def round_trip() -> None:
                await stub.RewindSession(rnnserve_pb2.RewindSessionRequest(session_id=session_id, tokens=count))
            return round_trip
        return on

    def score(session_id: str) -> RoundTrip:
        async def round_trip() -> None:
            await stub.Score(rnnserve_pb2.ScoreRequest(session_id=session_id, continuations=candidates))
        return round_trip

    def export_import(session_id: str) -> RoundTrip:
        async def round_trip() -> None:
            blob = (await stub.ExportSession(rnnserve_pb2.ExportSessionRequest(session_id=session_id))).state
            opened.append((await stub.ImportSession(rnnserve_pb2.ImportSessionRequest(state=blob))).session.session_id)
        return round_trip

    rewinds = [Operation("rewind-1", rewind(1), 1), Operation(f"rewind-{depth}", rewind(depth), depth)] if depth else []
    return [Operation("fork", fork), *rewinds, Operation(f"score-{SCORE_CANDIDATES}x{SCORE_TOKENS}", score),
            Operation("export-import", export_import)]


async def side_by_side(first: RoundTrip, second: RoundTrip, repeats: int, warmup: int,
                       before: RoundTrip | None = None) -> tuple[list[float], list[float]]:
    """`first` then `second`, timed in pairs `repeats` times after `warmup` untimed pairs; their latencies in us.

    Pairs rather than two loops: a slow spell of the shared machine falls on both sides alike.
    `before` runs untimed ahead of each pair.
    """
    firsts: list[float] = []
    seconds: list[float] = []
    for repetition in range(-warmup, repeats):
        if before is not None:
            await before()
        pair = await time_us(first), await time_us(second)
        if repetition >= 0:
            firsts.append(pair[0])
            seconds.append(pair[1])
    return firsts, seconds


def read_again(stub: rnnserve_pb2_grpc.InferenceStub, session_id: str, tokens: Sequence[int],
               count: int) -> RoundTrip:
    """`count` tokens read one at a time, as a client regenerating what it rewound would."""
    step = unary_round_trip(stub, session_id, one_token_at_a_time(tokens))

    async def round_trip() -> None:
        for _ in range(count):
            await step()

    return round_trip


async def operation_against_step(server: Endpoint, operation: Operation, sizes: Sizes, tokens: Sequence[int],
                                 prompt: Sequence[int], results: Results) -> None:
    """One operation paired with a one-token Step of the same session, which has read `prompt` first.

    What a rewind undid is read again one token at a time before the next pair, so each pair moves
    the session on by the step's one token: a rewind's target then walks over every distance from
    the checkpoints (a token at a time puts them every --rewind-checkpoint-every tokens, as in a
    long conversation), and its median is a typical replay, not the free rewind onto a checkpoint.
    """
    async with sessions(server.stub, 1, prompt) as [session_id]:
        step = unary_round_trip(server.stub, session_id, one_token_at_a_time(tokens))
        again = read_again(server.stub, session_id, tokens, operation.undoes)
        steps, ops = await side_by_side(step, operation.run(session_id), sizes.op_repeats, sizes.warmup_steps, again)
    results.add("OPS", operation.name, 1, "p50_us", p50(ops), "us")
    results.add("OPS", operation.name, 1, "p99_us", p99(ops), "us")
    results.add("OPS", operation.name, 1, "step_p50_us", p50(steps), "us")
    results.add("OPS", operation.name, 1, "op_step_ratio", p50(ops) / p50(steps), "ratio")


async def operation_costs(server: Endpoint, sizes: Sizes, tokens: Sequence[int], depth: int, results: Results) -> None:
    """Every operation in turn, each on a fresh session that has read a prompt of twice the rewind depth
    (64 tokens by default), so that a rewind of the depth undoes tokens read after the prompt."""
    opened: list[str] = []
    prompt = next(tokens_at_a_time(tokens, 2 * depth))
    for operation in operations(server.stub, tokens, depth, opened):
        await operation_against_step(server, operation, sizes, tokens, prompt, results)
    await close_sessions(server.stub, opened)


def cold_prompts(sizes: Sizes) -> Iterator[list[int]]:
    """Random prompts of the reference prompt's length, each new to the cache; never the unknown id 0."""
    generator = np.random.default_rng(COLD_PROMPT_SEED)
    while True:
        yield [int(t) for t in generator.integers(1, sizes.model.vocab_size, sizes.prefill_tokens)]


async def w6(server: Endpoint, sizes: Sizes, tokens: Sequence[int], results: Results) -> None:
    """Time to first prediction: a new session whose prompt (W4's, 1,000 tokens) is cached, against a cold read.

    The cold side reads a different random prompt of the same length each time, on the same server,
    rather than the same prompt on a second server started with --prefix-cache-entries 0: the two
    sides then alternate over one channel to one process, so the shared machine's slow spells fall
    on both, and a cold read pays what a miss costs on a server as deployed (the lookup and the
    caching of its state too, microseconds beside a prefill). Medians over W4's repetitions.
    """
    prompt = tokens[:sizes.prefill_tokens]
    opened = await create_sessions(server.stub, 1, prompt)  # its read puts the prompt in the cache
    cached, cold = await side_by_side(create_round_trip(server.stub, itertools.repeat(prompt), len(prompt), opened),
                                      create_round_trip(server.stub, cold_prompts(sizes), 0, opened),
                                      sizes.prefill_repeats, 1)
    await close_sessions(server.stub, opened)
    results.add("W6", "cached", 1, "p50_us", p50(cached), "us")
    results.add("W6", "cold", 1, "p50_us", p50(cold), "us")
    results.add("W6", "cached", 1, "cold_cached_ratio", p50(cold) / p50(cached), "ratio")


async def session_operations(command: list[str], sizes: Sizes, tokens: Sequence[int], depth: int, logs: Path,
                             results: Results, progress: Callable[[str], None]) -> None:
    """Each operation against a step, then W6, on a server of their own (`depth` is its --rewind-depth)."""
    progress("session operations against a step, and W6 cached prompts (fresh server)")
    with ServerProcess(command, logs / "server-operations.log") as process:
        async with connect(process) as server:
            await operation_costs(server, sizes, tokens, depth, results)
            await w6(server, sizes, tokens, results)
