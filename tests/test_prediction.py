"""Top-k over a batch, each row at its own temperature, against a plain per-row computation."""

import numpy as np
import pytest

from rnnserve.server.prediction import top_k


def per_row(logits: np.ndarray, k: int, temperature: float) -> tuple[list[int], np.ndarray]:
    scaled = logits.astype(np.float64) / temperature
    probabilities = np.exp(scaled - scaled.max())
    probabilities /= probabilities.sum()
    ids = np.argsort(-probabilities)[:k]
    return ids.tolist(), probabilities[ids]


@pytest.mark.parametrize("k", [1, 5, 13])
def test_batched_top_k_equals_per_row(k):
    rng = np.random.default_rng(k)
    logits = (3 * rng.standard_normal((6, 13))).astype(np.float32)  # [batch, vocab]
    temperatures = np.array([1.0, 0.5, 2.0, 100.0, 0.01, 1.0], np.float32)
    top = top_k(logits, k, 1.0 / temperatures)
    for row, prediction in enumerate(top.rows()):
        ids, probabilities = per_row(logits[row], k, float(temperatures[row]))
        assert prediction.token_ids == ids
        np.testing.assert_allclose(prediction.probabilities, probabilities, atol=1e-6)
        np.testing.assert_allclose(np.exp(prediction.logprobs), prediction.probabilities, rtol=1e-5, atol=1e-7)
