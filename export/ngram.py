"""Character n-gram baseline: the bits per character a trained RNN must beat to be worth serving.

The model is interpolated *modified* Kneser-Ney (Chen & Goodman 1998): three absolute discounts
per order (for n-grams seen once, twice, three or more times), estimated from count-of-counts,
with continuation counts (distinct left-extensions) at every order below the highest, and the
unigram level interpolated with a uniform distribution over the whole vocabulary. Every
character, `<unk>` and never-seen ones included, therefore gets a positive probability and the
probabilities sum to one, so the reported bits per character are honest.

Everything is numpy: an n-gram is one int64 key (base `vocab_size`), counting is `np.unique`, and
validation is scored one order at a time with `np.searchsorted` lookups, never a Python loop
over characters.

Run `python -m rnnserve.export.ngram` for the table on the default corpus.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from rnnserve.vocab import Vocabulary

FALLBACK_DISCOUNT = 0.5  # used where a tiny text has too few counts to estimate a discount


@dataclass(frozen=True)
class NgramResult:
    order: int
    bits_per_char: float


@dataclass(frozen=True)
class _Level:
    """One order of the model: n-gram keys with their discounted counts, and per-context totals."""

    keys: np.ndarray  # sorted n-gram keys
    discounted: np.ndarray  # count minus its discount, per key
    contexts: np.ndarray  # sorted keys of the n-gram minus its last character
    totals: np.ndarray  # sum of counts per context
    backoff: np.ndarray  # discount mass per context, handed to the order below


def _gram_keys(ids: np.ndarray, n: int, vocab_size: int) -> np.ndarray:
    """Key of every length-n window of `ids`, the window starting at position i at index i."""
    count = max(len(ids) - n + 1, 0)
    keys = np.zeros(count, dtype=np.int64)
    for j in range(n):
        keys = keys * vocab_size + ids[j:j + count]
    return keys


def _checked_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """`ids` as int64, refusing any id outside the vocabulary: it would silently alias another key."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size})")
    return ids


def _discounts(counts: np.ndarray) -> np.ndarray:
    """[0, D1, D2, D3+], indexed by min(count, 3): Chen & Goodman's count-of-counts estimates.

    Y = n1/(n1+2 n2), Di = i - (i+1) Y n(i+1)/n(i). A discount is kept only in (0, i]: above i a
    count would go negative, at 0 a context would pass no mass down and unseen characters would
    get probability zero. Outside that range (tiny texts only) FALLBACK_DISCOUNT is used.
    """
    n = np.bincount(np.minimum(counts, 5), minlength=6)[1:5].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = n[0] / (n[0] + 2 * n[1])
        d = np.array([i - (i + 1) * y * n[i] / n[i - 1] for i in (1, 2, 3)])
    valid = np.isfinite(d) & (d > 0) & (d <= np.arange(1, 4))
    return np.concatenate([[0.0], np.where(valid, d, FALLBACK_DISCOUNT)])


def _level(keys: np.ndarray, counts: np.ndarray, vocab_size: int) -> _Level:
    discount = _discounts(counts)[np.minimum(counts, 3)]
    # Keys are sorted, so keys // vocab_size (the context) is sorted too and groups are contiguous.
    contexts, starts = np.unique(keys // vocab_size, return_index=True)
    if len(keys) == 0:
        totals = backoff = np.zeros(0)
    else:
        totals = np.add.reduceat(counts.astype(np.float64), starts)
        backoff = np.add.reduceat(discount, starts)
    return _Level(keys, counts - discount, contexts, totals, backoff)


def _find(keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, index) of each query in the sorted, non-empty `keys`; index is meaningless where not found."""
    index = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return keys[index] == queries, index


@dataclass(frozen=True)
class KneserNeyModel:
    """A fitted model; public so that tests can check it is a proper distribution."""

    vocab_size: int
    levels: tuple[_Level, ...]  # levels[k - 1] holds the k-grams

    @classmethod
    def fit(cls, train_ids: np.ndarray, vocab_size: int, order: int) -> "KneserNeyModel":
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        if vocab_size ** order >= 2 ** 63:
            raise ValueError(f"order={order} with vocab_size={vocab_size} overflows int64 n-gram keys")
        train_ids = _checked_ids(train_ids, vocab_size)
        types, counts = np.unique(_gram_keys(train_ids, order, vocab_size), return_counts=True)
        levels = [_level(types, counts, vocab_size)]
        for k in range(order - 1, 0, -1):
            # Continuation count of a k-gram: how many distinct characters precede it in training.
            keys, counts = np.unique(types % vocab_size ** k, return_counts=True)
            levels.append(_level(keys, counts, vocab_size))
            # All k-gram types: those with a left-extension, plus the text-initial one (which has none).
            types = np.union1d(keys, _gram_keys(train_ids[:k], k, vocab_size))
        return cls(vocab_size, tuple(reversed(levels)))

    def log2_probs(self, ids: np.ndarray) -> np.ndarray:
        """log2 p(ids[t] | up to order-1 previous ids) for t = 1 .. len(ids)-1."""
        ids = _checked_ids(ids, self.vocab_size)
        probs = np.full(max(len(ids) - 1, 0), 1.0 / self.vocab_size)
        for k, level in enumerate(self.levels, start=1):
            # Windows ending at t >= max(1, k-1): position 0 is never predicted, and earlier
            # positions lack a full k-1 context, so they keep the lower-order estimate.
            first = max(1, k - 1)
            grams = _gram_keys(ids, k, self.vocab_size)[first - (k - 1):]
            if len(level.keys) == 0 or len(grams) == 0:
                continue  # nothing learned at this order, or no position has a long enough context
            lower = probs[first - 1:]
            seen, context = _find(level.contexts, grams // self.vocab_size)
            found, gram = _find(level.keys, grams)
            mixed = np.where(found, level.discounted[gram], 0.0) + level.backoff[context] * lower
            probs[first - 1:] = np.where(seen, mixed / level.totals[context], lower)
        return np.log2(probs)


def kneser_ney_bpc(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int, order: int) -> float:
    """Bits per character on `val_ids` (every id after the first) of an order-`order` model of `train_ids`."""
    if len(val_ids) < 2:
        raise ValueError("val_ids needs at least two ids: the first is only context")
    return float(-KneserNeyModel.fit(train_ids, vocab_size, order).log2_probs(val_ids).mean())


def best_baseline(train_text: str, val_text: str, vocab: Vocabulary,
                  orders: Iterable[int] = range(3, 8)) -> tuple[NgramResult, list[NgramResult]]:
    """The lowest-bpc order and the result of every order tried."""
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)
    results = [NgramResult(n, kneser_ney_bpc(train_ids, val_ids, len(vocab), n)) for n in orders]
    if not results:
        raise ValueError("orders is empty")
    return min(results, key=lambda r: r.bits_per_char), results


def main() -> None:
    from rnnserve.export.corpus import load_corpus

    corpus = load_corpus(None)
    vocab = Vocabulary.from_text(corpus.train_text)
    start = time.perf_counter()
    best, results = best_baseline(corpus.train_text, corpus.val_text, vocab)
    seconds = time.perf_counter() - start
    print(f"{corpus.sizes['train_chars']:,} train / {corpus.sizes['val_chars']:,} val chars, "
          f"vocabulary {len(vocab)} (uniform: {math.log2(len(vocab)):.3f} bits/char)")
    print("order  bits/char")
    for result in results:
        print(f"{result.order:5d}  {result.bits_per_char:9.4f}{'  <- best' if result == best else ''}")
    print(f"interpolated modified Kneser-Ney, {seconds:.1f} s for all orders")


if __name__ == "__main__":
    main()
