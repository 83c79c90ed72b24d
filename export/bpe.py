"""A byte-level BPE vocabulary trained with Hugging Face `tokenizers` on the training split only.

Byte-level (GPT-2's pre-tokenizer and decoder) so that every text, whatever its characters, has an
exact encoding and decodes back to itself. Trained on the training split alone: the validation
plays must stay unseen, by the tokenizer as by the model.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DEFAULT_VOCAB_SIZE = 4096


def train_byte_level_bpe(train_text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Lines, not one string: the trainer counts words per item, and a 4 MB item would be one job.
    tokenizer.train_from_iterator(train_text.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` in one call, as the server encodes a session's text (int64)."""
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int64)


def characters_per_token(tokenizer: Tokenizer) -> np.ndarray:
    """[vocab]: how many characters of text each token starts, to turn bits per token into bits per
    character. A character has exactly one byte that is not a UTF-8 continuation byte (0x80-0xBF), so
    over any run of tokens these counts add up to the characters the run holds, even where a token
    ends inside a multi-byte character."""
    byte_of = {stand_in: byte for byte, stand_in in enumerate(_byte_stand_ins())}
    counts = np.zeros(tokenizer.get_vocab_size(), np.int64)
    for piece, index in tokenizer.get_vocab().items():
        counts[index] = sum(1 for ch in piece if not 0x80 <= byte_of[ch] <= 0xBF)
    return counts


def _byte_stand_ins() -> list[str]:
    """GPT-2's printable stand-ins for the bytes 0..255, in byte order: what ByteLevel writes a byte as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]
