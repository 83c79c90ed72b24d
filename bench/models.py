"""Issue 14's two-model rows: W2 at the most sessions on a server with two models loaded and busy, beside one model.

The question they answer is a user's: what does a second busy model cost me? The two models are
copies of the reference bundle under the names "a" and "b" (version 1 each, in a model
repository as the server reads one), so that they differ in name only, never in the work a step
costs. Three closed loops, each W2's own (a stream per session, the most sessions, one load
generator), on fresh servers in turn:

- one-model: a server whose repository holds "a" alone, every session on it: the baseline;
- one-busy: a server holding "a" and "b", every session on "a", "b" loaded and idle;
- two-busy: that same server, half the sessions on "a" and half on "b", both busy at once.

Each version has its own state pool, batcher and model thread, so the two models' calls can run
at the same time, each on half as many sessions. What to expect on 2 cores, which the load
generator and a one-model server already keep busy: about the one-model figure. More if one
model's onnxruntime call overlaps the other's Python work (batching, scattering, answering),
less if half-sized batches, and two models' onnxruntime and model threads contending for two
cores, cost more; so the ratios are reported, not judged, until full runs show where they sit.
Each ratio is the median over rounds of that round's ratio, as M1's (the servers of a round run
back to back and share whatever else the machine was doing). Each model's own rate and latency
in the two-busy loop are reported beside it, so that a model starved by the other shows.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from rnnserve.bundle import Bundle, write_manifest

from bench.load import Endpoint, RoundTrip, closed_loop, connect, one_token_at_a_time, open_streams, stream_round_trip
from bench.processes import ServerProcess
from bench.sizes import Sizes
from bench.stats import Results, Rounds, Timed, p50, p99
from bench.workloads import sessions

WORKLOAD = "W2-models"
NAMES = ("a", "b")
# The flags of both servers: a repository read once at start, never polled while the loops run.
FLAGS = ["--model-poll-seconds", "0"]


def repository(bundle: Bundle, root: Path, names: Sequence[str]) -> Path:
    """A model repository at `root`, made anew: `bundle` once per name, as version 1 (its manifest renamed to match
    the layout, which the server checks)."""
    shutil.rmtree(root, ignore_errors=True)
    for name in names:
        version = root / name / "1"
        shutil.copytree(bundle.path, version)
        write_manifest(version, {**bundle.manifest, "name": name, "version": "1"})
    return root


@dataclass(frozen=True)
class Share:
    """One model's part of a loop that served several: its steps' latencies, and its tokens/s from its first timed
    send to its last answer."""

    tokens_per_s: float
    latencies_us: list[float]


def noted(round_trip: RoundTrip, warmup: int, spans: list[tuple[float, float]]) -> RoundTrip:
    """`round_trip`, with when each step after the first `warmup` was sent and answered appended to `spans`."""
    calls = 0

    async def noted_round_trip() -> None:
        nonlocal calls
        sent = time.perf_counter()
        await round_trip()
        calls += 1
        if calls > warmup:
            spans.append((sent, time.perf_counter()))

    return noted_round_trip


async def stream_steps_on(server: Endpoint, counts: Mapping[str, int], sizes: Sizes,
                          tokens: Sequence[int]) -> tuple[Timed, dict[str, Share]]:
    """W2 over streams with `counts[name]` sessions on each model `name`, all in one closed loop: the loop's
    figures, and each model's share of them."""
    spans: dict[str, list[tuple[float, float]]] = {name: [] for name in counts}
    async with AsyncExitStack() as stack:
        trips = []
        for name, count in counts.items():
            ids = await stack.enter_async_context(sessions(server.stub, count, model=name))
            calls = await stack.enter_async_context(open_streams(server.stub, count))
            trips += [noted(stream_round_trip(call, session_id, one_token_at_a_time(tokens)), sizes.warmup_steps,
                            spans[name]) for call, session_id in zip(calls, ids)]
        timed = await closed_loop(trips, sizes.w2_steps, sizes.warmup_steps, server.pid)
    shares = {name: Share(len(steps) / (max(answered for _, answered in steps) - min(sent for sent, _ in steps)),
                          [(answered - sent) * 1e6 for sent, answered in steps])
              for name, steps in spans.items()}
    return timed, shares


async def two_models(command: Callable[[Path], list[str]], bundle: Bundle, sizes: Sizes, tokens: Sequence[int],
                     logs: Path, results: Results, progress: Callable[[str], None]) -> None:
    """The three loops on their two servers, round after round; `command` is the server's command line for a
    repository path, with the run's flags."""
    count, half = sizes.most_sessions, sizes.most_sessions // 2
    root = bundle.path.with_name(bundle.path.name + "-models")  # beside the reference bundle, in the cache
    one, two = repository(bundle, root / "one", NAMES[:1]), repository(bundle, root / "two", NAMES)
    split = {NAMES[0]: half, NAMES[1]: count - half}
    rounds, shares, ratios = Rounds(), defaultdict(list), defaultdict(list)
    for number in range(1, sizes.models_rounds + 1):
        progress(f"W2 at {count} sessions on a one-model server, round {number} of {sizes.models_rounds}")
        with ServerProcess(command(one), logs / "server-models-one.log") as process:
            async with connect(process) as server:
                alone, _ = await stream_steps_on(server, {NAMES[0]: count}, sizes, tokens)
        progress(f"W2 at {count} sessions on a two-model server: all on one, then half on each, round {number}")
        with ServerProcess(command(two), logs / "server-models-two.log") as process:
            async with connect(process) as server:
                one_busy, _ = await stream_steps_on(server, {NAMES[0]: count}, sizes, tokens)
                two_busy, by_model = await stream_steps_on(server, split, sizes, tokens)
        for variant, timed in (("one-model", alone), ("one-busy", one_busy), ("two-busy", two_busy)):
            rounds.add(WORKLOAD, f"stream-{variant}", count, timed)
        for name, share in by_model.items():
            shares[name].append(share)
        ratios["two_busy_one_model_ratio"].append(two_busy.tokens_per_s / alone.tokens_per_s)
        ratios["two_busy_one_busy_ratio"].append(two_busy.tokens_per_s / one_busy.tokens_per_s)
        ratios["one_busy_one_model_ratio"].append(one_busy.tokens_per_s / alone.tokens_per_s)
    rounds.report(results)
    for name, model_shares in shares.items():  # each figure the median of its rounds', as Results.add_loops
        for metric, figure, unit in (("tokens_per_s", lambda share: share.tokens_per_s, "tokens/s"),
                                     ("p50_us", lambda share: p50(share.latencies_us), "us"),
                                     ("p99_us", lambda share: p99(share.latencies_us), "us")):
            results.add(WORKLOAD, f"stream-two-busy-{name}", split[name], metric,
                        statistics.median(map(figure, model_shares)), unit)
    for metric, values in ratios.items():
        results.add(WORKLOAD, "stream", count, metric, statistics.median(values), "ratio")
