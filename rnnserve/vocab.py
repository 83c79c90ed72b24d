"""Character vocabulary: the one mapping between text and token ids, shipped inside the bundle.

Torch-free, because the server encodes prompts and decodes predictions with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

UNKNOWN_TOKEN = "<unk>"
UNKNOWN_ID = 0


class Vocabulary:
    """Id 0 is the unknown token; every other id is one character of the training text."""

    def __init__(self, tokens: Sequence[str]):
        if not tokens or tokens[UNKNOWN_ID] != UNKNOWN_TOKEN:
            raise ValueError(f"vocabulary must start with the unknown token {UNKNOWN_TOKEN!r}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has duplicate tokens")
        if any(len(t) != 1 for t in tokens[1:]):
            raise ValueError("every token but the unknown token must be one character")
        self.tokens = list(tokens)
        self._ids = {t: i for i, t in enumerate(self.tokens) if i != UNKNOWN_ID}
        # Byte-indexed table for the common ASCII case: encoding a prompt is one numpy lookup.
        self._ascii = np.full(128, UNKNOWN_ID, dtype=np.int64)
        for token, index in self._ids.items():
            if ord(token) < 128:
                self._ascii[ord(token)] = index

    @classmethod
    def from_text(cls, text: str) -> "Vocabulary":
        return cls([UNKNOWN_TOKEN, *sorted(set(text))])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> np.ndarray:
        """Ids of `text`, one per character; characters never seen in training map to UNKNOWN_ID."""
        if text.isascii():
            return self._ascii[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
        return np.fromiter((self._ids.get(ch, UNKNOWN_ID) for ch in text), dtype=np.int64, count=len(text))

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[i] for i in ids)

    def token(self, index: int) -> str:
        return self.tokens[index]
