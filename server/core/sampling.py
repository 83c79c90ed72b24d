"""How each generated token is chosen: greedy, or drawn at a temperature from a top-k / top-p nucleus.

Draws come from a numpy Generator seeded per call, so the same seed, session state and
settings give the same continuation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnnserve.evaluate import log_softmax


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no limit
    seed: int | None = None  # None: a fresh random seed

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self._random = np.random.default_rng(params.seed)

    def choose(self, logits: np.ndarray) -> tuple[int, float]:
        """logits [vocab] -> (token id, its probability under the distribution it was drawn from)."""
        params = self.params
        if params.greedy:
            logprobs = log_softmax(logits.astype(np.float64))
            token = int(np.argmax(logprobs))
            return token, float(np.exp(logprobs[token]))
        logprobs = log_softmax(logits.astype(np.float64) / params.temperature)  # [vocab]
        ranked = np.argsort(-logprobs, kind="stable")  # token ids, most likely first
        if params.top_k:
            ranked = ranked[: params.top_k]
        probabilities = np.exp(logprobs[ranked])
        probabilities /= probabilities.sum()
        if params.top_p < 1.0:
            # The smallest prefix whose probability reaches top_p.
            keep = int(np.searchsorted(np.cumsum(probabilities), params.top_p)) + 1
            ranked, probabilities = ranked[:keep], probabilities[:keep] / probabilities[:keep].sum()
        index = int(self._random.choice(len(ranked), p=probabilities))
        return int(ranked[index]), float(probabilities[index])
