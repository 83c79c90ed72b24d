"""Corpus loading and splitting, and the vocabulary round trip."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from rnnserve.export.corpus import MIN_CHARS, CorpusError, load_corpus, split_files
from rnnserve.vocab import UNKNOWN_ID, Vocabulary


def test_missing_corpus_is_named(tmp_path: Path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "nowhere.txt")


def test_empty_corpus_is_refused(tmp_path: Path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="is empty"):
        load_corpus(tmp_path / "empty.txt")


def test_empty_folder_is_refused(tmp_path: Path):
    with pytest.raises(CorpusError, match="holds no files"):
        load_corpus(tmp_path)


def test_binary_corpus_is_refused(tmp_path: Path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(CorpusError, match="binary"):
        load_corpus(tmp_path / "blob.bin")


def test_non_utf8_corpus_is_refused(tmp_path: Path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 1000)
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(tmp_path / "latin1.txt")


def test_short_corpus_names_the_minimum(tmp_path: Path):
    (tmp_path / "short.txt").write_text("to be or not to be")
    with pytest.raises(CorpusError, match=f"at least {MIN_CHARS}"):
        load_corpus(tmp_path / "short.txt")


def test_split_holds_out_every_tenth_file_by_name():
    files = {f"play_{i:02d}.txt": f"text of play {i}\n" for i in range(25)}
    train, val, held = split_files(files)
    assert held == ["play_09.txt", "play_19.txt"]
    assert val == files["play_09.txt"] + files["play_19.txt"]
    assert "play 9\n" not in train and "play 19\n" not in train and "play 24\n" in train


def test_single_file_holds_out_its_last_tenth(tmp_path: Path):
    text = "".join(f"line {i}\n" for i in range(1000))
    (tmp_path / "one.txt").write_text(text)
    corpus = load_corpus(tmp_path / "one.txt")
    assert corpus.train_text + corpus.val_text == text
    assert len(corpus.val_text) == len(text) // 10


@given(st.text(min_size=1))
def test_vocabulary_round_trips_its_training_text(text: str):
    vocab = Vocabulary.from_text(text)
    ids = vocab.encode(text)
    assert vocab.decode(ids) == text
    assert UNKNOWN_ID not in ids


def test_unseen_characters_map_to_unknown():
    vocab = Vocabulary.from_text("abc")
    assert list(vocab.encode("abz")) == [vocab.encode("a")[0], vocab.encode("b")[0], UNKNOWN_ID]
    assert list(vocab.encode("ab\u00e9")) == list(vocab.encode("abz"))


def test_ascii_and_unicode_paths_agree():
    vocab = Vocabulary.from_text("hello world\u00e9")
    np.testing.assert_array_equal(vocab.encode("hello"), vocab.encode("hello\u00e9")[:5])
