"""The n-gram baseline is only a fair bar for the RNN if it is a proper distribution and scores sanely."""

import math

import numpy as np
import pytest

from rnnserve.export.ngram import KneserNeyModel, best_baseline, kneser_ney_bpc
from rnnserve.vocab import Vocabulary

PATTERN = "the cat sat on the mat. "


def _next_char_probs(model: KneserNeyModel, context: list[int]) -> np.ndarray:
    """p(w | context) for every w in the vocabulary, through the same path that scores validation."""
    return np.array([2.0 ** model.log2_probs(np.array([*context, w]))[-1] for w in range(model.vocab_size)])


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_probabilities_sum_to_one_over_the_vocabulary(order):
    text = "abracadabra alakazam, abracadabra!"
    vocab = Vocabulary([*Vocabulary.from_text(text).tokens, "q", "w"])  # two characters never seen in training
    model = KneserNeyModel.fit(vocab.encode(text), len(vocab), order)
    contexts = ["a", "ab", "abr", "abra", "cad", "qq", "w a", "!", "xyz"]  # seen, unseen, unknown, short
    for context in contexts:
        probs = _next_char_probs(model, list(vocab.encode(context)))
        assert probs.sum() == pytest.approx(1.0, abs=1e-9), context
        assert (probs > 0).all(), context


def test_repeated_pattern_gets_low_bpc_and_higher_orders_do_not_collapse():
    vocab = Vocabulary.from_text(PATTERN)
    train, val = vocab.encode(PATTERN * 200), vocab.encode(PATTERN[5:] + PATTERN * 20)
    bpc = [kneser_ney_bpc(train, val, len(vocab), order) for order in range(1, 9)]
    assert bpc[6] < 0.5
    for lower, higher in zip(bpc, bpc[1:]):
        assert higher <= lower + 0.05


def test_uniform_random_text_scores_close_to_log2_k():
    k = 4
    rng = np.random.default_rng(0)
    train, val = rng.integers(1, k + 1, 20_000), rng.integers(1, k + 1, 5_000)  # id 0 is <unk>
    assert kneser_ney_bpc(train, val, k + 1, 3) == pytest.approx(math.log2(k), abs=0.03)


def test_best_baseline_picks_the_lowest_and_survives_unknown_characters():
    vocab = Vocabulary.from_text(PATTERN)
    best, results = best_baseline(PATTERN * 50, "#" + PATTERN * 5, vocab, orders=range(1, 6))
    assert [r.order for r in results] == [1, 2, 3, 4, 5]
    assert best.bits_per_char == min(r.bits_per_char for r in results)
    assert all(math.isfinite(r.bits_per_char) for r in results)


@pytest.mark.parametrize("order", [0, -1])
def test_order_below_one_is_rejected(order):
    ids = np.array([1, 2, 1, 2])
    with pytest.raises(ValueError, match="order"):
        kneser_ney_bpc(ids, ids, 3, order)
