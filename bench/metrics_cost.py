"""M1, the cost of metrics: W2's throughput on servers with metrics on and off.

The 5% being checked is about the noise between two runs on a small machine, so each round
starts a fresh server of each kind in turn, and the figure is the median over the rounds of each
round's ratio: a pair run back to back shares whatever else the machine was doing. The server's
CPU time per token is reported beside the rate: it depends less on what else runs.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.load import connect
from bench.processes import ServerProcess
from bench.sizes import Sizes
from bench.stats import Results, Timed
from bench.workloads import stream_steps, unary_steps

VARIANTS = {"metrics-off": ["--metrics-listen", ""], "metrics-on": ["--metrics-listen", "127.0.0.1:0"]}
TRANSPORTS = {"stream": stream_steps, "unary": unary_steps}


async def m1(command: Sequence[str], sizes: Sizes, tokens: Sequence[int], logs: Path, results: Results,
             progress: Callable[[str], None]) -> None:
    count = sizes.most_sessions
    loops: dict[tuple[str, str], list[Timed]] = defaultdict(list)
    for round_number in range(1, sizes.metrics_rounds + 1):
        for variant, flags in VARIANTS.items():
            progress(f"M1 metrics cost, round {round_number} of {sizes.metrics_rounds}: {variant}")
            with ServerProcess([*command, *flags], logs / f"server-{variant}.log") as process:
                async with connect(process) as server:
                    for transport, steps in TRANSPORTS.items():
                        loops[transport, variant].append(
                            await steps(server, count, sizes.w2_steps, sizes.warmup_steps, tokens))
    for (transport, variant), timed in loops.items():
        results.add("M1", f"{transport} {variant}", count, "tokens_per_s",
                    statistics.median(t.tokens_per_s for t in timed), "tokens/s")
        results.add("M1", f"{transport} {variant}", count, "server_cpu_us_per_token",
                    statistics.median(t.server_cpu_seconds / t.tokens * 1e6 for t in timed), "us")
    for transport in TRANSPORTS:
        pairs = zip(loops[transport, "metrics-on"], loops[transport, "metrics-off"])
        results.add("M1", transport, count, "on_off_ratio",
                    statistics.median(on.tokens_per_s / off.tokens_per_s for on, off in pairs), "ratio")
