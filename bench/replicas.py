"""Issue 12's scale-out: what the proxy, the session store and write-through cost, and what hibernation saves.

Redis and HAProxy are Debian's binaries, started exactly as the tests start them
(tests/redis_process.py, tests/haproxy_process.py, with the shipped deploy/haproxy/haproxy.cfg).
- R1: W2's closed loops at the most sessions (a Step call per step, and a stream per session)
  through HAProxy against the same replica direct. One replica behind the proxy: on the shared
  2 cores, more replicas would measure the cores, not the proxy.
- R2: putting one session at rest in Redis (hold, encode, compare-and-set write, free) and waking
  one (claim, decode, admit), each timed alone on a live engine in this process, one at a time.
- R3: W2's unary loop and W1's single session with write-through off, every 16 tokens and every token.
- R4: resident memory of a replica holding W5's sessions, all but a hundredth of them idle and
  hibernated, the rest stepping: memory follows the active sessions, Redis holds the rest.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
from rnnserve.bundle import Bundle
from rnnserve.server.core.engine import CreateInput, Engine, StepInput
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2_grpc

from bench.load import Endpoint, closed_loop, connect, one_token_at_a_time, unary_round_trip
from bench.processes import ServerProcess
from bench.sizes import Sizes
from bench.stats import Results, p50, p99
from bench.workloads import create_sessions, stream_steps, unary_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the peers as the tests start them
from haproxy_process import HAProxyProcess  # noqa: E402
from redis_process import RedisProcess  # noqa: E402
from serving import free_port  # noqa: E402

WRITE_THROUGH = (0, 16, 1)
ACTIVE_SHARE = 100  # R4: one session in this many keeps stepping
HIBERNATE_AFTER_SECONDS = 10.0  # R4: an active session steps far more often than this, even on a busy machine
STORE_FLAGS = ["--hibernate-after-seconds", "0"]  # R1, R3: nothing hibernates under the loops


@asynccontextmanager
async def through(address: str, pid: int):
    """An Endpoint reaching the server at `pid` through `address` (the proxy)."""
    async with grpc.aio.insecure_channel(address) as channel:
        yield Endpoint(rnnserve_pb2_grpc.InferenceStub(channel), pid, address)


async def r1_proxy(command: list[str], redis_url: str, sizes: Sizes, tokens: Sequence[int], workdir: Path,
                   results: Results) -> None:
    count = sizes.most_sessions
    loops: list[tuple[str, Callable]] = [("unary", unary_steps), ("stream", stream_steps)]
    with ServerProcess([*command, "--redis-url", redis_url, *STORE_FLAGS], workdir / "server-r1.log") as process:
        with HAProxyProcess(workdir, [process.address]) as proxy:
            for kind, loop in loops:  # direct and proxied in alternation: slow spells fall on both
                async with connect(process) as direct:
                    results.add_loop("R1", f"{kind}-direct", count,
                                     await loop(direct, count, sizes.w2_steps, sizes.warmup_steps, tokens))
                async with through(proxy.address, process.pid) as proxied:
                    results.add_loop("R1", f"{kind}-proxy", count,
                                     await loop(proxied, count, sizes.w2_steps, sizes.warmup_steps, tokens))


async def r2_hibernate_and_wake(bundle: Bundle, redis_url: str, sizes: Sizes, tokens: Sequence[int],
                                results: Results) -> None:
    engine = Engine([(bundle, True)], Settings(redis_url=redis_url, hibernate_after_seconds=0))
    await engine.start()
    try:
        prompt = StepInput(np.asarray(tokens[:32], np.int64), top_k=1, temperature=1.0)
        model = engine.models.get()
        created = [await engine.create_session("bench", model, CreateInput(0, prompt))
                   for _ in range(sizes.op_repeats)]
        hibernate, wake = [], []
        for session in (c.session for c in created):
            started = time.perf_counter_ns()
            await engine.hibernation.put_at_rest([session])
            hibernate.append((time.perf_counter_ns() - started) / 1e3)
        for session in (c.session for c in created):
            started = time.perf_counter_ns()
            await engine.find_session(session.id, "bench")
            wake.append((time.perf_counter_ns() - started) / 1e3)
    finally:
        engine.drain()
        await engine.stop()
    for variant, latencies in (("hibernate", hibernate), ("wake", wake)):
        results.add("R2", variant, 1, "p50_us", p50(latencies), "us")
        results.add("R2", variant, 1, "p99_us", p99(latencies), "us")


async def r3_write_through(command: list[str], redis_url: str, sizes: Sizes, tokens: Sequence[int], workdir: Path,
                           results: Results) -> None:
    count = sizes.most_sessions
    for every in WRITE_THROUGH:
        flags = ["--redis-url", redis_url, *STORE_FLAGS, "--write-through-every", str(every)]
        with ServerProcess([*command, *flags], workdir / f"server-r3-{every}.log") as process:
            async with connect(process) as server:
                variant = f"every-{every}" if every else "off"
                results.add_loop("R3", variant, 1, await unary_steps(server, 1, sizes.w1_steps, sizes.warmup_steps,
                                                                     tokens))
                results.add_loop("R3", variant, count, await unary_steps(server, count, sizes.w2_steps,
                                                                         sizes.warmup_steps, tokens))


def active_sessions(metrics_address: str) -> int:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("rnnserve_sessions_active{"):
                return int(float(line.rsplit(" ", 1)[1]))
    raise RuntimeError("no rnnserve_sessions_active in the metrics")


async def keep_stepping(trips: list, pid: int, stop: asyncio.Event) -> None:
    """Step every session of `trips` once per round until `stop`: they stay active, never hibernated."""
    while not stop.is_set():
        await closed_loop(trips, 1, 0, pid)


async def r4_memory(command: list[str], redis: RedisProcess, sizes: Sizes, tokens: Sequence[int], workdir: Path,
                    results: Results) -> None:
    """The active sessions are the first created, and step throughout, while the rest are created, go idle and
    hibernate: as in a replica that has run a while, they sit in the lowest slots, which new sessions take first."""
    count, active = sizes.w5_sessions, max(1, sizes.w5_sessions // ACTIVE_SHARE)
    metrics = f"127.0.0.1:{free_port()}"
    flags = ["--redis-url", redis.url, "--hibernate-after-seconds", str(HIBERNATE_AFTER_SECONDS),
             "--max-sessions", str(count + 1), "--metrics-listen", metrics]
    with ServerProcess([*command, *flags], workdir / "server-r4.log") as process:
        async with connect(process) as server:
            baseline = process.rss_bytes()
            ids = await create_sessions(server.stub, active, tokens[:1])
            trips = [unary_round_trip(server.stub, i, one_token_at_a_time(tokens)) for i in ids]
            stop = asyncio.Event()
            stepping = asyncio.create_task(keep_stepping(trips, process.pid, stop))
            try:
                await create_sessions(server.stub, count - active, tokens[:1])
                deadline = time.monotonic() + 10 * HIBERNATE_AFTER_SECONDS + count / 1000
                while active_sessions(metrics) > active:
                    assert time.monotonic() < deadline, "the idle sessions did not hibernate"
                    await asyncio.sleep(1.0)
                await asyncio.sleep(2.0)  # the sweep after the last move gives the pool's free rows back
                rss = process.rss_bytes()
            finally:
                stop.set()
                await stepping
    results.add("R4", "hibernating", count, "rss_bytes", rss, "bytes")
    results.add("R4", "hibernating", count, "active_sessions", active, "sessions")
    results.add("R4", "hibernating", count, "baseline_rss_bytes", baseline, "bytes")
    results.add("R4", "hibernating", count, "redis_used_memory_bytes", redis.used_memory(), "bytes")


async def scale_out(command: list[str], bundle: Bundle, sizes: Sizes, tokens: Sequence[int], logs: Path,
                    results: Results, progress: Callable[[str], None]) -> None:
    """R1-R4, each on fresh servers, with one Redis (emptied between stages) and, for R1, HAProxy."""
    with tempfile.TemporaryDirectory(prefix="rnnserve-bench-") as scratch, RedisProcess(Path(scratch)) as redis:
        workdir = logs / "replicas"
        workdir.mkdir(parents=True, exist_ok=True)
        progress(f"R1 {sizes.most_sessions} sessions through HAProxy against direct (fresh server, Redis)")
        await r1_proxy(command, redis.url, sizes, tokens, workdir, results)
        redis.flush()
        progress("R2 hibernate and wake-up, one session at a time (an engine in this process)")
        await r2_hibernate_and_wake(bundle, redis.url, sizes, tokens, results)
        redis.flush()
        progress(f"R3 write-through off, every {WRITE_THROUGH[1]} and every token (fresh servers)")
        await r3_write_through(command, redis.url, sizes, tokens, workdir, results)
        redis.flush()
        progress(f"R4 memory of {sizes.w5_sessions:,} sessions, {ACTIVE_SHARE}th of them active (fresh server)")
        await r4_memory(command, redis, sizes, tokens, workdir, results)
