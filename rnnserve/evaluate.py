"""Validation in bits per character, the same way for PyTorch in training and onnxruntime at export.

The validation text is cut into parallel streams (so the model is evaluated at batch size,
not one character at a time), each read chunk by chunk with its state carried, exactly as the
server reads a long session. Torch-free: the test that re-measures the committed bundle uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EVAL_STREAMS = 32
EVAL_CHUNK = 256

# (tokens [B, T], state) -> (logits [B, T, V], new state)
StepFn = Callable[[np.ndarray, tuple], tuple[np.ndarray, tuple]]


@dataclass(frozen=True)
class Score:
    """Bits per character compare models over any vocabulary on the same text; bits per token (and its
    perplexity) is the figure for ids without text. With one character per token the two are equal."""

    bits_per_char: float
    top1: float
    chars: int
    tokens: int
    bits_per_token: float
    text: bool = True

    @property
    def perplexity(self) -> float:
        return 2.0 ** self.bits_per_token

    def to_dict(self) -> dict:
        per_token = {"val_tokens": self.tokens, "val_bits_per_token": round(float(self.bits_per_token), 4),
                     "val_perplexity": round(float(self.perplexity), 3)}
        if not self.text:
            return {"val_top1": round(float(self.top1), 4), **per_token}
        figures = {"val_bpc": round(float(self.bits_per_char), 4), "val_top1": round(float(self.top1), 4),
                   "val_chars": self.chars}
        return figures if self.tokens == self.chars else {**figures, **per_token}


def as_streams(ids: np.ndarray, streams: int = EVAL_STREAMS) -> np.ndarray:
    """[streams, length]: the text cut into equal contiguous pieces (the ragged tail is dropped)."""
    length = len(ids) // streams
    if length < 2:
        raise ValueError(f"{len(ids)} tokens are too few for {streams} evaluation streams")
    return ids[: streams * length].reshape(streams, length)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def evaluate(step: StepFn, state: tuple, ids: np.ndarray, streams: int = EVAL_STREAMS,
             chunk: int = EVAL_CHUNK, max_chunks: int | None = None,
             characters: np.ndarray | None = None, text: bool = True) -> Score:
    """Mean bits per predicted character and top-1 accuracy over `ids` (or its first chunks).

    `characters` [vocab] says how many characters each id holds (a subword vocabulary); without
    it every id is one character. `text` False: ids without text, measured per token only.
    """
    data = as_streams(ids, streams)
    inputs, targets = data[:, :-1], data[:, 1:]
    nats = 0.0
    correct = 0
    count = 0
    chars = 0
    for index, start in enumerate(range(0, inputs.shape[1], chunk)):
        if max_chunks is not None and index >= max_chunks:
            break
        x, y = inputs[:, start:start + chunk], targets[:, start:start + chunk]
        logits, state = step(np.ascontiguousarray(x), state)
        logp = log_softmax(logits.astype(np.float64))
        nats -= np.take_along_axis(logp, y[..., None], axis=-1).sum()
        correct += int((logits.argmax(-1) == y).sum())
        count += y.size
        chars += int(characters[y].sum()) if characters is not None else y.size
    bits = nats / math.log(2)
    return Score(bits / chars, correct / count, chars, count, bits / count, text)


def evaluate_bundle(bundle, ids: np.ndarray, streams: int = EVAL_STREAMS, chunk: int = EVAL_CHUNK,
                    characters: np.ndarray | None = None) -> Score:
    """Score a bundle's ONNX graph with onnxruntime: the figure the manifest records.

    `characters` as for `evaluate`; a vocabulary without text is measured per token."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle.graph_path), providers=["CPUExecutionProvider"])
    outputs = [bundle.logits_output, *(s.output for s in bundle.states)]

    def step(tokens: np.ndarray, state: tuple) -> tuple[np.ndarray, tuple]:
        feed = {bundle.tokens_input: tokens, **{s.input: v for s, v in zip(bundle.states, state)}}
        logits, *new = session.run(outputs, feed)
        return logits, tuple(new)

    state = tuple(s.zeros(streams) for s in bundle.states)  # [streams, *row_shape] each
    return evaluate(step, state, ids, streams, chunk, characters=characters, text=bundle.vocab.has_text)
