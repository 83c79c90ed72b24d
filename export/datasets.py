"""What `rnnserve-train` learns from, as token ids: text under a character or BPE vocabulary, or ids.

Every kind ends in the same form (train and validation ids, the vocabulary's size and the record a
checkpoint keeps to rebuild it), so the training loop and the measurement do not care which it is.
Text keeps its measure in bits per character whatever the vocabulary: `characters` says how many
characters each id holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnnserve.vocab import AnyVocabulary, IdVocabulary, TokenizerVocabulary, Vocabulary

DATASETS = ("text", "bach-chorales")
TOKENIZERS = ("chars", "bpe")


@dataclass(frozen=True)
class TokenData:
    train_ids: np.ndarray
    val_ids: np.ndarray
    vocab_size: int
    vocabulary: dict                  # {"kind": ...}: what a checkpoint keeps to rebuild the vocabulary
    description: dict                 # where the data came from and its split
    characters: np.ndarray | None     # [vocab] characters each id holds; None for ids without text

    @property
    def unit(self) -> str:
        return "token" if self.characters is None else "character"


def load_token_data(dataset: str, corpus: str | None, tokenizer: str, bpe_vocab_size: int) -> TokenData:
    if dataset == "bach-chorales":
        from rnnserve.export.chorales import load_chorales

        return load_chorales()
    if dataset != "text":
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    from rnnserve.export.corpus import load_corpus

    text = load_corpus(corpus)
    if tokenizer == "chars":
        vocab = Vocabulary.from_text(text.train_text)
        return TokenData(vocab.encode(text.train_text), vocab.encode(text.val_text), len(vocab),
                         {"kind": "characters", "tokens": vocab.tokens}, text.description,
                         np.ones(len(vocab), np.int64))
    if tokenizer == "bpe":
        from rnnserve.export import bpe

        trained = bpe.train_byte_level_bpe(text.train_text, bpe_vocab_size)
        return TokenData(bpe.encode(trained, text.train_text), bpe.encode(trained, text.val_text),
                         trained.get_vocab_size(), {"kind": "tokenizer", "json": trained.to_str()},
                         {**text.description, "tokenizer": f"byte-level BPE, {trained.get_vocab_size()} tokens, "
                                                           "trained on the training split"},
                         bpe.characters_per_token(trained))
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")


def vocabulary_of(record: dict) -> AnyVocabulary:
    """The served vocabulary of a checkpoint's `vocabulary` record (TokenData.vocabulary)."""
    if record["kind"] == "characters":
        return Vocabulary(record["tokens"])
    if record["kind"] == "tokenizer":
        return TokenizerVocabulary(record["json"])
    return IdVocabulary(record["size"])


def characters_of(vocabulary: AnyVocabulary) -> np.ndarray | None:
    """Characters per id for `evaluate`: one each for characters, counted for a BPE, None without text."""
    if isinstance(vocabulary, TokenizerVocabulary):
        from tokenizers import Tokenizer

        from rnnserve.export import bpe

        return bpe.characters_per_token(Tokenizer.from_str(vocabulary.json))
    return np.ones(len(vocabulary), np.int64) if vocabulary.has_text else None


def validation_ids(training: dict, vocabulary: AnyVocabulary) -> np.ndarray:
    """A run's validation split under its own vocabulary, from its training configuration."""
    if training.get("dataset", "text") == "bach-chorales":
        from rnnserve.export.chorales import load_chorales

        return load_chorales().val_ids
    from rnnserve.export.corpus import load_corpus

    return vocabulary.encode(load_corpus(training.get("corpus")).val_text)
