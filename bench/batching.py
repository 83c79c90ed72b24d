"""Issue 15's batcher settings side by side: W2 unary at the most sessions and W1, on a server per setting.

Unary callers form batches only from the steps that happen to be queued when the model comes
free; a wait lets more of them arrive, but a fixed one (--max-queue-delay-us) is paid by a lone
session too. The adaptive wait (--adaptive-wait-us, the default) waits only while fewer steps are
queued than sessions answered moments ago have yet to come back, and only while they keep
arriving (--adaptive-gap-us), so it should fill W2's unary batches and leave W1 alone: both are
measured on each setting. --loop-max-tokens 0 sends W1's lone step to the model thread, which shows what the
default (running it on the event loop's thread) saves. Each setting gets a fresh server, in turn,
round after round, and each figure is the median of its rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from bench.load import connect
from bench.processes import ServerProcess
from bench.sizes import Sizes
from bench.stats import Results, Rounds
from bench.workloads import stream_steps, unary_steps

# A row's variant is its transport and the setting's name: ("W2", "unary-adaptive-500", 256).
SETTINGS = {
    "no-wait": ["--adaptive-wait-us", "0"],
    "fixed-200": ["--adaptive-wait-us", "0", "--max-queue-delay-us", "200"],
    "fixed-1000": ["--adaptive-wait-us", "0", "--max-queue-delay-us", "1000"],
    "adaptive-5000": [],  # the server's defaults: --adaptive-wait-us 5000 --adaptive-gap-us 500
    "adaptive-5000-gap-2000": ["--adaptive-gap-us", "2000"],
    "loop-max-tokens-0": ["--loop-max-tokens", "0"],
}


async def batching(command: Sequence[str], sizes: Sizes, tokens: Sequence[int], logs: Path, results: Results,
                   progress: Callable[[str], None]) -> None:
    """W1 over its stream and W2 as a Step call per step, at the most sessions, on each setting's server."""
    rounds, count = Rounds(), sizes.most_sessions
    for number in range(1, sizes.batching_rounds + 1):
        for setting, flags in SETTINGS.items():
            progress(f"batching, round {number} of {sizes.batching_rounds}: {setting} (fresh server)")
            with ServerProcess([*command, *flags], logs / f"server-batching-{setting}.log") as process:
                async with connect(process) as server:
                    rounds.add("W1", f"stream-{setting}", 1,
                               await stream_steps(server, 1, sizes.w1_steps, sizes.warmup_steps, tokens))
                    rounds.add("W2", f"unary-{setting}", count,
                               await unary_steps(server, count, sizes.w2_steps, sizes.warmup_steps, tokens))
    rounds.report(results)
