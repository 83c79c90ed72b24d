"""`python -m bench.architectures BUNDLE...`: what serving costs per token beyond the model, for any bundles.

The question (issue 24) is whether a new architecture (a subword GRU, a state-space layer with a 4-D
state, a model of ids) costs the server the same per token as the character LSTM once the model's own
work is taken out. For each bundle, in one run: F1, the graph alone in-process through the server's
Runtime (CPU per token of single steps at batch 1 and at the most sessions), and W2, a fresh server
stepped over a stream per session, closed loop, at 1 and at the most sessions (the server's CPU per
token). "Beyond the model" is W2's server CPU per token less F1's at the same batch. CPU time, not
throughput: on a shared machine it swings far less. Figures are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from bench.load import connect
from bench.processes import ServerProcess
from bench.run import server_command
from bench.workloads import stream_steps
from rnnserve.bundle import Bundle, load_bundle
from rnnserve.server.model.runtime import Runtime
from rnnserve.server.settings import Settings

SESSIONS = (1, 256)
# Enough calls and steps that each figure spans seconds of CPU: /proc counts a server's CPU in 10 ms ticks.
F1_CALLS = {1: 2000, 256: 100}
W2_STEPS = {1: 1000, 256: 100}  # per session
WARMUP = 10


def f1_cpu_us_per_token(bundle: Bundle, batch: int, settings: Settings) -> float:
    """CPU time of one single-token step at `batch` through the server's Runtime, per token, in microseconds."""
    runtime = Runtime(bundle, settings.ort_threads, settings.ort_spins)
    tokens = np.ones((batch, 1), np.int64)
    states = tuple(s.zeros(batch) for s in bundle.states)
    runtime.run(tokens, states)  # the first call allocates
    start = time.process_time()
    for _ in range(F1_CALLS[batch]):
        runtime.run(tokens, states)
    return (time.process_time() - start) / (F1_CALLS[batch] * batch) * 1e6


async def w2_cpu_us_per_token(bundle: Bundle, count: int, log: Path) -> tuple[float, float]:
    """(server CPU per token in microseconds, tokens/s) of W2 over streams at `count` sessions on a fresh server."""
    steps = W2_STEPS[count]
    tokens = [1 + i % (len(bundle.vocab) - 1) for i in range(steps + WARMUP + 1)]
    with ServerProcess(server_command(bundle.path, []), log) as server:
        async with connect(server) as endpoint:
            timed = await stream_steps(endpoint, count, steps, WARMUP, tokens)
    return timed.server_cpu_seconds / timed.tokens * 1e6, timed.tokens_per_s


async def measure(bundles: list[Bundle], logs: Path) -> list[dict]:
    rows = []
    for bundle in bundles:
        for count in SESSIONS:
            f1 = f1_cpu_us_per_token(bundle, count, Settings())
            served, rate = await w2_cpu_us_per_token(bundle, count, logs / f"{bundle.name}-{count}.log")
            rows.append({"model": bundle.name, "cell": bundle.cell, "vocabulary": bundle.vocab.kind,
                         "states": bundle.describe_states(), "sessions": count,
                         "f1_cpu_us_per_token": round(f1, 1), "w2_server_cpu_us_per_token": round(served, 1),
                         "beyond_model_cpu_us_per_token": round(served - f1, 1), "w2_tokens_per_s": round(rate)})
            print(f"{bundle.name:<20} {count:>4} sessions: F1 {f1:8.1f} us/token CPU, W2 server {served:8.1f}, "
                  f"beyond the model {served - f1:8.1f} ({rate:,.0f} tokens/s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.architectures", description=__doc__.splitlines()[0])
    parser.add_argument("bundles", type=Path, nargs="+", help="bundle directories, the character LSTM's first")
    parser.add_argument("--out", type=Path, default=Path("bench/.cache/architectures.json"),
                        help="where the rows go as JSON (default %(default)s)")
    args = parser.parse_args(argv)
    bundles = [load_bundle(path) for path in args.bundles]
    rows = asyncio.run(measure(bundles, args.out.parent / "logs"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
