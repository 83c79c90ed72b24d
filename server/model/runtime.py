"""onnxruntime and one bundle: tokens and state in, next-token logits and new state out.

Knows neither sessions nor gRPC. Results are fresh arrays, never written into the caller's
state, so a caller can decide afterwards whether to commit them.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from rnnserve.bundle import Bundle


class RunResult(NamedTuple):
    next_logits: np.ndarray  # [batch, vocab] float32: the prediction after each row's last token
    states: tuple[np.ndarray, ...]  # [batch, *row_shape] each, in bundle.states order and dtypes
    seconds: float  # time inside onnxruntime, for metrics
    logits: np.ndarray  # [batch, time, vocab] float32: the prediction after every token, for scoring


def usable_cpus() -> int:
    """CPUs this process may run on: a container pinned to some CPUs sees those, not the host's."""
    return len(os.sched_getaffinity(0))


def session_options(threads: int, spinning: bool) -> ort.SessionOptions:
    """Sequential execution (the graph is a chain) and all graph optimisations.

    `threads` 0 means one per usable CPU: on the 2-core machine, 1.4x the single-thread speed at
    batch 1 and 1.7x at batch 256. `spinning` lets onnxruntime's threads spin a short while for
    the next call instead of sleeping at once. Measured side by side with the reference model on
    a 2-core virtual machine: spinning took W1 from 1,313 to 1,027-1,068 us a step (waking a
    sleeping virtual CPU is slow) and a 256-session StepBatch from 20,400-21,000 to 21,200-22,100
    tokens/s, but at 256 sessions it took unary Step calls from 4,170-4,325 to 2,094-2,337 tokens/s
    and streams from 8,242-8,657 to 6,662-7,930, because a spinning thread holds a core the event
    loop needs. Hence off by default.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class Runtime:
    def __init__(self, bundle: Bundle, threads: int, spinning: bool):
        self.bundle = bundle
        self._session = ort.InferenceSession(str(bundle.graph_path), session_options(threads, spinning),
                                             providers=["CPUExecutionProvider"])
        self._tokens_input = bundle.tokens_input
        self._state_inputs = [s.input for s in bundle.states]
        self._outputs = [bundle.logits_output, *(s.output for s in bundle.states)]

    def run(self, tokens: np.ndarray, states: tuple[np.ndarray, ...]) -> RunResult:
        """tokens [batch, time] int64, states [batch, *row_shape] each (bundle order, the bundle's dtypes)."""
        feed = dict(zip(self._state_inputs, states, strict=True))
        feed[self._tokens_input] = tokens
        start = time.perf_counter()
        logits, *new_states = self._session.run(self._outputs, feed)  # logits [batch, time, vocab]
        seconds = time.perf_counter() - start
        return RunResult(np.ascontiguousarray(logits[:, -1]), tuple(new_states), seconds, logits)
