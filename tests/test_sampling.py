"""Choosing generated tokens: greedy is the argmax; a seed reproduces draws; top-k and top-p bound them."""

import numpy as np

from rnnserve.server.core.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([0.05, 0.4, 0.3, 0.2, 0.05], np.float32))  # [vocab]


def draws(params: SamplingParams, count: int = 400) -> list[int]:
    sampler = Sampler(params)
    return [sampler.choose(LOGITS)[0] for _ in range(count)]


def test_greedy_is_the_most_likely_token_with_its_probability():
    token, probability = Sampler(SamplingParams()).choose(LOGITS)
    assert token == 1 and abs(probability - 0.4) < 1e-6


def test_the_same_seed_draws_the_same_tokens():
    params = SamplingParams(temperature=1.0, seed=7)
    assert draws(params) == draws(params)
    assert draws(params) != draws(SamplingParams(temperature=1.0, seed=8))


def test_top_k_and_top_p_keep_only_the_most_likely():
    assert set(draws(SamplingParams(temperature=1.0, top_k=2, seed=0))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.65, seed=0))) == {1, 2}  # 0.4 + 0.3 reaches 0.65
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.3, seed=0))) == {1}


def test_probability_is_under_the_distribution_drawn_from():
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    for _ in range(20):
        token, probability = sampler.choose(LOGITS)
        assert abs(probability - {1: 0.4 / 0.7, 2: 0.3 / 0.7}[token]) < 1e-6
