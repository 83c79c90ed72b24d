"""Next-token predictions for a whole batch at once: top-k ids with their probabilities.

Vectorised over the batch so that the per-step cost is a slice of lists made once per batch;
each row has its own temperature.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from rnnserve.evaluate import log_softmax


class Prediction(NamedTuple):
    """The k most likely next tokens, most likely first (parallel lists)."""

    token_ids: list[int]
    probabilities: list[float]
    logprobs: list[float]


class TopK(NamedTuple):
    """The k most likely tokens of every row, most likely first."""

    token_ids: np.ndarray  # [batch, k] int64
    probabilities: np.ndarray  # [batch, k] float32
    logprobs: np.ndarray  # [batch, k] float32

    def rows(self) -> list[Prediction]:
        """One Prediction per row, made with one conversion per array instead of one per element."""
        return [Prediction(*row) for row in zip(self.token_ids.tolist(), self.probabilities.tolist(),
                                               self.logprobs.tolist())]


def top_k(logits: np.ndarray, k: int, inverse_temperature: np.ndarray) -> TopK:
    """logits [batch, vocab] float32, inverse_temperature [batch] -> the k most likely per row.

    Temperature does not change which tokens are most likely, only their probabilities, so the
    ranking is taken once for the whole batch and each row is scaled by its own temperature.
    """
    vocab = logits.shape[1]
    logprobs = log_softmax(logits * inverse_temperature[:, None])  # [batch, vocab]
    if k < vocab:
        candidates = np.argpartition(logprobs, vocab - k, axis=1)[:, vocab - k:]  # [batch, k], unordered
    else:
        candidates = np.broadcast_to(np.arange(vocab), logprobs.shape)
    candidate_logprobs = np.take_along_axis(logprobs, candidates, axis=1)
    order = np.argsort(-candidate_logprobs, axis=1, kind="stable")  # [batch, k]
    ids = np.take_along_axis(candidates, order, axis=1)
    top_logprobs = np.take_along_axis(candidate_logprobs, order, axis=1)
    return TopK(ids, np.exp(top_logprobs), top_logprobs)
