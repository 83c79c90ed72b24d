"""Issue 15's int8 rows: the reference model's int8 copy (rnnserve-quantize's) served, beside the fp32 rows.

An int8 step reads a quarter of the weight bytes, which is what a small batch waits on, while a
large batch pays for quantizing its activations: so the copy's F1 is measured at one session and
at the most, and W1 and W2 (a stream each and a Step call each, at the most sessions) on a server
serving it, to show whether int8 pays on this machine once gRPC and the batcher are in the way.
Its rows are named as the fp32 ones with "-int8" on the workload ("F1-int8", "W2-int8"), and
"F1-fp32" is the fp32 bundle's F1 measured beside the copy's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from rnnserve.bundle import Bundle, BundleError, default_repository_path, load_bundle
from rnnserve.export.quantize import quantize_bundle
from rnnserve.repository import ModelRepository
from rnnserve.server.core.model_loading import checked_bundle

from bench.floors import F1
from bench.load import connect
from bench.processes import ServerProcess
from bench.sizes import Sizes
from bench.stats import Results
from bench.workloads import stream_steps, unary_steps

SUFFIX = "-int8"


def shipped_int8_copy(source: Bundle) -> Bundle | None:
    """The version of the shipped model repository that rnnserve-quantize made from `source`'s very graph, if any
    (version 2 of the shipped default model, for its version 1)."""
    model = ModelRepository.scan(default_repository_path()).models.get(source.name)
    for version in model.versions if model else ():
        copy = load_bundle(model.version_path(version))
        if copy.manifest.get("quantization", {}).get("source_sha256") == source.sha256:
            return copy
    return None


def int8_bundle(source: Bundle, tokens: Sequence[int]) -> Bundle:
    """The shipped int8 copy of `source` if there is one, else the cached one beside it, or a new one when that
    is missing or would no longer serve (the server's checks: a copy quantized before rnnserve-quantize measured
    the copy's own parity states the float graph's tolerance, which no int8 graph meets).

    rnnserve-quantize refuses a copy that costs too much accuracy; random weights have none to
    lose, so no cost is refused, and the reference tokens stand in for a validation split.
    """
    shipped = shipped_int8_copy(source)
    if shipped is not None:
        return shipped
    path = source.path.with_name(source.path.name + SUFFIX)
    try:
        return checked_bundle(path)
    except BundleError:
        return quantize_bundle(source.path, path, np.array(tokens, np.int64), max_bpc_cost=math.inf)


async def int8(command: Callable[[Path], list[str]], bundle: Bundle, threads: int, spinning: bool, sizes: Sizes,
               tokens: list[int], logs: Path, results: Results, progress: Callable[[str], None]) -> None:
    """F1 of the int8 copy at one session and the most, then W1 and W2 on a server of its own serving it.

    The fp32 bundle's F1 is measured again beside it ("F1-fp32"), round for round, so that the two
    are read at the same moments of this shared machine rather than minutes apart.

    `command` is the server's command line for a bundle path, with the run's flags.
    """
    progress("int8 copy of the reference bundle")
    quantized = int8_bundle(bundle, tokens)
    count = sizes.most_sessions
    progress(f"F1{SUFFIX} and F1-fp32 at batch 1 and {count}, in turn")
    floors = [F1(copy, threads, spinning, replace(sizes, batches=(1, count)), tokens, name)
              for copy, name in ((quantized, f"F1{SUFFIX}"), (bundle, "F1-fp32"))]
    for _ in range(sizes.f1_rounds):
        for f1 in floors:
            f1.measure_round()
    for f1 in floors:
        f1.report(results)
    progress(f"W1{SUFFIX} and W2{SUFFIX} at {count} sessions (fresh server)")
    with ServerProcess(command(quantized.path), logs / f"server{SUFFIX}.log") as process:
        async with connect(process) as server:
            results.add_loop(f"W1{SUFFIX}", "stream", 1,
                             await stream_steps(server, 1, sizes.w1_steps, sizes.warmup_steps, tokens))
            for variant, steps in (("stream", stream_steps), ("unary", unary_steps)):
                results.add_loop(f"W2{SUFFIX}", variant, count,
                                 await steps(server, count, sizes.w2_steps, sizes.warmup_steps, tokens))
