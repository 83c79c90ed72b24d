"""Vocabularies: the one mapping between text and token ids, shipped inside the bundle.

Three kinds, one interface, so that nothing past the faces asks which kind it serves:
- characters (`Vocabulary`): one id per character of the training text, id 0 the unknown token;
- a Hugging Face `tokenizers` tokenizer (`TokenizerVocabulary`): BPE, Unigram, WordPiece or byte-level,
  shipped in the bundle as tokenizer.json;
- ids only (`IdVocabulary`): sequences with no text (events, products, notes); text is refused.

Torch-free, because the server encodes prompts and decodes predictions with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

UNKNOWN_TOKEN = "<unk>"
UNKNOWN_ID = 0
CHARACTERS, TOKENIZER, IDS = "characters", "tokenizer", "ids"
TOKENIZER_FILE = "tokenizer.json"
REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that do not yet make a whole UTF-8 character


class NoText(ValueError):
    """Text given to a vocabulary of ids only; the faces answer it naming the text field."""


class Vocabulary:
    """Characters. Id 0 is the unknown token; every other id is one character of the training text."""

    kind = CHARACTERS
    has_text = True

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

    def detokenizer(self) -> "Detokenizer":
        return CharacterDetokenizer(self.tokens)

    def manifest_entry(self) -> dict:
        return {"kind": CHARACTERS, "unknown_id": UNKNOWN_ID, "tokens": self.tokens}


class TokenizerVocabulary:
    """A `tokenizers` tokenizer: text is encoded without added special tokens, so ids are exactly the model's.

    `tokens` holds each id decoded alone, the text a candidate is named by; a byte-level piece that
    is part of a character reads as U+FFFD there. Streamed text uses `detokenizer`, which never does.
    """

    kind = TOKENIZER
    has_text = True

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer  # here: character and id bundles serve without the library's import time

        self.json = tokenizer_json
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.tokens = self._tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=False)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> np.ndarray:
        return np.array(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token(self, index: int) -> str:
        return self.tokens[index]

    def detokenizer(self) -> "Detokenizer":
        return IncrementalDetokenizer(self)

    def manifest_entry(self) -> dict:
        return {"kind": TOKENIZER, "file": TOKENIZER_FILE}


class IdVocabulary:
    """Ids only: `size` ids that name no text. Candidates and generated tokens carry empty text."""

    kind = IDS
    has_text = False

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"an id vocabulary needs at least 1 id, got {size}")
        self.tokens = [""] * size

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> np.ndarray:
        raise NoText(f"this model's vocabulary is {len(self)} ids with no text: give token ids")

    def decode(self, ids: Iterable[int]) -> str:
        return ""

    def token(self, index: int) -> str:
        return ""

    def detokenizer(self) -> "Detokenizer":
        return CharacterDetokenizer(self.tokens)

    def manifest_entry(self) -> dict:
        return {"kind": IDS, "size": len(self)}


AnyVocabulary = Vocabulary | TokenizerVocabulary | IdVocabulary


class CharacterDetokenizer:
    """Text of a stream where every token is its own text (characters) or none (ids)."""

    def __init__(self, tokens: Sequence[str]):
        self._tokens = tokens

    def push(self, token: int) -> str:
        return self._tokens[token]

    def flush(self) -> str:
        return ""


class IncrementalDetokenizer:
    """The text a stream of subword ids adds with each id, as TGI and vLLM stream it.

    Decoding a token alone is wrong twice over: a byte-level piece may be half a character, and a
    decoder may join pieces (Metaspace's leading space, WordPiece's "##"). So each push decodes the
    window from `_prefix` (ids already shown) and emits what it adds to the window's earlier text,
    holding it back while it ends in U+FFFD, an incomplete character. The window is at most a few
    ids past the last emitted text: constant work per token.
    """

    def __init__(self, vocabulary: TokenizerVocabulary):
        self._decode = vocabulary.decode
        self._ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already emitted; they give the next ids context
        self._read = 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        shown = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if text.endswith(REPLACEMENT) or len(text) <= len(shown):
            return ""  # an incomplete character: wait for the bytes that finish it
        self._prefix, self._read = self._read, len(self._ids)
        del self._ids[:self._prefix]  # keep only the window: memory and work stay constant
        self._read -= self._prefix
        self._prefix = 0
        return text[len(shown):]

    def flush(self) -> str:
        """Whatever is held back when the stream ends, incomplete characters written as U+FFFD."""
        shown = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(shown):]


Detokenizer = CharacterDetokenizer | IncrementalDetokenizer


def vocabulary_from_manifest(entry: dict, read_file) -> AnyVocabulary:
    """The vocabulary a manifest's `vocabulary` entry describes; `read_file(name)` reads a file beside it.

    An entry without `kind` is format 1's: characters.
    """
    kind = entry.get("kind", CHARACTERS)
    if kind == CHARACTERS:
        return Vocabulary(entry["tokens"])
    if kind == TOKENIZER:
        return TokenizerVocabulary(read_file(entry.get("file", TOKENIZER_FILE)))
    if kind == IDS:
        return IdVocabulary(int(entry["size"]))
    raise ValueError(f"vocabulary kind {kind!r} is not one of {CHARACTERS}, {TOKENIZER}, {IDS}")
