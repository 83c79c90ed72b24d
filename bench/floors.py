"""The floors every server figure is read against, measured in the same run on the same cores.

F1 is the model alone: onnxruntime in this process on the bundle's graph, through the server's
own Runtime class (so configured as the server configures it), at the batch sizes the server
would form. F2 is the transport alone: the echo server (bench/echo.py) in its own process,
driven by the same closed loop as W2.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rnnserve.bundle import Bundle
from rnnserve.server.model.runtime import Runtime

from bench.load import closed_loop, connect, one_token_at_a_time, open_streams, stream_round_trip, unary_round_trip
from bench.processes import ServerProcess
from bench.sizes import Sizes
from bench.stats import Results, Rounds, p50

ECHO_SERVER = Path(__file__).with_name("echo.py")


def zero_states(bundle: Bundle, batch: int) -> tuple[np.ndarray, ...]:
    """[batch, *row_shape] zeros per state tensor: a recurrent model's cost does not depend on the values."""
    return tuple(s.zeros(batch) for s in bundle.states)


PACED_GAP_SECONDS = 0.001  # about what a served step spends outside the model between two calls


def call_times_us(call: Callable[[], object], seconds: float, min_calls: int, gap_seconds: float = 0.0) -> list[float]:
    """Time `call` repeatedly for about `seconds`, at least `min_calls` times, after one untimed call;
    with `gap_seconds`, each call after that long a pause, untimed."""
    call()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < deadline:
        if gap_seconds:
            time.sleep(gap_seconds)
        start = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return times


class F1:
    """Single steps at each batch size, and one prefill, through the server's own Runtime; and
    batch-1 steps 1 ms apart, the pace of served steps, which find less of the weights in cache.

    The Runtime is the server's onnxruntime session (threads, spinning, optimisations) and nothing
    else: no sessions, no batcher, no gRPC. `threads` and `spinning` are what the server under
    test is given. The run calls `measure_round` at points spread over it (this shared machine
    has slow spells of tens of seconds: one read batch 256 at 11,000 tokens/s for a whole round
    of every size, and 18,500 minutes later), and each figure is the median of the rounds. Its rows
    are the `workload`'s: "F1" for the reference bundle, another name for a copy of it (int8).
    """

    def __init__(self, bundle: Bundle, threads: int, spinning: bool, sizes: Sizes, tokens: list[int],
                 workload: str = "F1"):
        self._bundle, self._sizes, self._tokens, self._workload = bundle, sizes, tokens, workload
        self._runtime = Runtime(bundle, threads, spinning)
        self._rounds: list[dict[tuple[str, int], float]] = []

    @property
    def rounds_left(self) -> int:
        return self._sizes.f1_rounds - len(self._rounds)

    def measure_round(self) -> None:
        """One p50 of every figure, and the CPU time per token this process spent at each batch size."""
        found = {}
        for batch in self._sizes.batches:
            found["ort", batch], found["ort-cpu", batch] = self._calls(batch)
        # back-to-back calls keep the weights in cache; a server's calls have gaps between them
        found["ort-paced", 1], _ = self._calls(1, PACED_GAP_SECONDS)
        found["prefill", 1] = self._prefill_p50()
        self._rounds.append(found)

    def report(self, results: Results) -> None:
        for variant, batch in self._rounds[0]:
            median = statistics.median(found[variant, batch] for found in self._rounds)
            if variant == "ort-cpu":  # onnxruntime's CPU per token, its threads included: the model's floor
                results.add(self._workload, "ort", batch, "cpu_us_per_token", median, "us")
                continue
            results.add(self._workload, variant, batch, "p50_us", median, "us")
            tokens_per_call = self._sizes.prefill_tokens if variant == "prefill" else batch
            results.add(self._workload, variant, batch, "tokens_per_s", tokens_per_call / median * 1e6, "tokens/s")

    def _batch_of(self, size: int, length: int = 1) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        tokens = np.array(self._tokens[:size * length], np.int64).reshape(size, length)
        return tokens, zero_states(self._bundle, size)

    def _calls(self, size: int, gap_seconds: float = 0.0) -> tuple[float, float]:
        """The median call in microseconds, and this process's CPU time per token over the calls (with the
        untimed first; a pause uses none)."""
        step, states = self._batch_of(size)
        cpu = time.process_time()
        times = call_times_us(lambda: self._runtime.run(step, states), self._sizes.f1_seconds,
                              self._sizes.f1_min_calls, gap_seconds)
        return p50(times), (time.process_time() - cpu) / ((len(times) + 1) * size) * 1e6

    def _prefill_p50(self) -> float:
        prompt, states = self._batch_of(1, self._sizes.prefill_tokens)
        return p50(call_times_us(lambda: self._runtime.run(prompt, states), 0.0, self._sizes.prefill_repeats))


async def f2(sizes: Sizes, tokens: list[int], loop: str, log: Path, results: Results, rounds: Rounds,
             stream_counts: tuple[int, ...]) -> None:
    """The echo server, on the server's event loop `loop`, at each of `stream_counts`, closed loop, as
    W2 drives the real one; then F2u, a Step call per step, at one caller and the most (one call in
    flight each), as W2 unary drives it. The counts the targets read (one and the most) go to `rounds`:
    the run measures them again before each later round of W1 and W2, against which they are read
    (one full run found the echo at 256 streams at 14,969 messages/s, others at 17,000-18,400)."""
    headline = {1, sizes.most_sessions}
    with ServerProcess([sys.executable, str(ECHO_SERVER), "--event-loop", loop], log) as echo:
        async with connect(echo) as endpoint:
            for streams in stream_counts:
                async with open_streams(endpoint.stub, streams) as calls:
                    trips = [stream_round_trip(call, f"echo-{i}", one_token_at_a_time(tokens))
                             for i, call in enumerate(calls)]
                    timed = await closed_loop(trips, sizes.w2_steps, sizes.warmup_steps, endpoint.pid)
                record = rounds.add if streams in headline else results.add_loop
                record("F2", "echo", streams, timed, "messages_per_s", "messages/s")
            for callers in sorted(headline):
                trips = [unary_round_trip(endpoint.stub, f"echo-{i}", one_token_at_a_time(tokens))
                         for i in range(callers)]
                timed = await closed_loop(trips, sizes.w2_steps, sizes.warmup_steps, endpoint.pid)
                rounds.add("F2u", "unary-echo", callers, timed, "calls_per_s", "calls/s")
