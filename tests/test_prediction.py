"""Top-k over a batch, each row at its own temperature, against a plain per-row computation."""

import numpy as np
import pytest

from rnnserve.server.core.prediction import Ranker


def per_row(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Every token's probability, in float64."""
    scaled = logits.astype(np.float64) / temperature
    probabilities = np.exp(scaled - scaled.max())
    return probabilities / probabilities.sum()


@pytest.mark.parametrize("k", [1, 5, 8, 9, 13])  # 13: the whole vocabulary
def test_batched_top_k_equals_per_row(k):
    rng = np.random.default_rng(k)
    logits = (3 * rng.standard_normal((6, 13))).astype(np.float32)  # [batch, vocab]
    temperatures = np.array([1.0, 0.5, 2.0, 100.0, 0.01, 1.0], np.float32)
    vocabulary = [chr(ord("a") + i) for i in range(13)]
    for row, prediction in enumerate(Ranker(vocabulary).predictions(logits, k, 1.0 / temperatures)):
        assert prediction.texts == [vocabulary[i] for i in prediction.token_ids]
        probabilities = per_row(logits[row], float(temperatures[row]))
        # the k best, best first; tokens whose probabilities tie within float32 may come in either order
        np.testing.assert_allclose(prediction.probabilities, np.sort(probabilities)[::-1][:k], atol=1e-6)
        np.testing.assert_allclose(prediction.probabilities, probabilities[prediction.token_ids], atol=1e-6)
        assert len(set(prediction.token_ids)) == k
        np.testing.assert_allclose(np.exp(prediction.logprobs), prediction.probabilities, rtol=1e-5, atol=1e-7)


def test_tied_tokens_come_lower_id_first():
    logits = np.zeros((2, 7), np.float32)
    logits[1, [2, 5]] = 1.0  # two tied leaders, then five tied followers
    top = Ranker(list("abcdefg")).top_k(logits, 4, np.ones(2, np.float32))
    assert top.token_ids.tolist() == [[0, 1, 2, 3], [2, 5, 0, 1]]


def test_the_coldest_temperature_allowed_is_greedy_and_finite():
    logits = np.array([[0.5, 2.0, 1.999]], np.float32)
    top = Ranker(list("abc")).top_k(logits, 3, np.array([1.0 / 1e-6], np.float32))  # convert.MIN_STEP_TEMPERATURE
    assert top.token_ids[0, 0] == 1 and np.isfinite(top.logprobs).all()
    assert top.probabilities[0, 0] == pytest.approx(1.0)
