"""What one step of a graph costs in onnxruntime: the figure bundles record as `serving_cost`. No torch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnnserve import bundle as bundle_format
from rnnserve.server.model.runtime import session_options
from rnnserve.server.settings import Settings

SERVER_DEFAULTS = Settings()


def measure_step_cost(graph_path: Path, specs: Sequence[bundle_format.StateSpec],
                      batches: Sequence[int] = (1, 256), repeats: int = 50) -> dict[str, float]:
    """Median time of one single-token step at each batch size, with the server's onnxruntime options
    (its default threads and spinning)."""
    session = ort.InferenceSession(str(graph_path),
                                   session_options(SERVER_DEFAULTS.ort_threads, SERVER_DEFAULTS.ort_spins),
                                   providers=["CPUExecutionProvider"])
    cost = {}
    for batch in batches:
        feed = {bundle_format.TOKENS_INPUT: np.ones((batch, 1), np.int64),
                **{s.input: s.zeros(batch) for s in specs}}
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        cost[f"step_us_batch{batch}"] = round(float(np.median(times)) * 1e6, 1)
    return cost
