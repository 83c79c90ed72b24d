"""The prefix-state cache: the state after a prompt, kept so that a new session with that prompt skips reading it.

A recurrent model's state after a prompt is one row of a few KiB, whatever the prompt's length,
so a cached 1,000-token prompt costs a copy of that row instead of a model call over 1,000
tokens. Entries are keyed by the model's graph sha256 and the prompt's exact tokens (compared as
bytes, so no two prompts can share an entry) and found by the longest cached prefix of a new
prompt: the rest of the prompt is read from there. Least recently used entries go first once
the cache holds more than `max_entries` or `max_bytes`; pinned entries (named states) stay
until unpinned and count toward neither bound.

Results are the same as reading the prompt: an entry is the very state (and next-token logits)
a cold read of the same tokens produced.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rnnserve.server.model.state_pool import Row


class CacheEvents(Protocol):
    """Where the cache reports lookups, for metrics."""

    def record_prefix_lookup(self, reused_tokens: int) -> None: ...


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    tokens: np.ndarray  # [time] int64, read-only
    rows: Row  # the state and next-token logits after `tokens`, never written once cached


class PrefixCache:
    def __init__(self, model_sha256: str, *, max_entries: int, max_bytes: int, min_tokens: int, row_bytes: int,
                 events: CacheEvents | None = None):
        self.model_sha256 = model_sha256
        self.max_entries = max_entries
        self.min_tokens = min_tokens  # shorter prompts are not cached (nor counted as misses): a copy saves little
        self.max_bytes = max_bytes
        self.row_bytes = row_bytes
        self.events = events
        self._entries: OrderedDict[tuple[str, bytes], CachedPrefix] = OrderedDict()  # least recently used first
        self._pinned: dict[tuple[str, bytes], CachedPrefix] = {}
        self._lengths: Counter[int] = Counter()  # prompt lengths held, so a lookup tries only those
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._pinned)

    def _key(self, tokens: np.ndarray) -> tuple[str, bytes]:
        return self.model_sha256, tokens.tobytes()

    def _entry_bytes(self, entry: CachedPrefix) -> int:
        return self.row_bytes + entry.tokens.nbytes

    def longest_prefix(self, tokens: np.ndarray) -> CachedPrefix | None:
        """The entry of the longest cached prefix of `tokens` (all of them included), None when none is cached."""
        for length in sorted((n for n in self._lengths if n <= len(tokens)), reverse=True):
            key = self._key(tokens[:length])
            entry = self._pinned.get(key)
            if entry is None and (entry := self._entries.get(key)) is not None:
                self._entries.move_to_end(key)
            if entry is not None:
                self._report(length)
                return entry
        if len(tokens) >= self.min_tokens:
            self._report(0)
        return None

    def put(self, tokens: np.ndarray, rows: Row) -> None:
        """Remember `rows` as the state after `tokens`, then evict down to the bounds."""
        if not self.max_entries or len(tokens) < self.min_tokens:
            return
        key = self._key(tokens)
        if key in self._pinned or key in self._entries:
            return
        entry = self._entries[key] = CachedPrefix(_read_only(tokens), rows)
        self._lengths[len(tokens)] += 1
        self.bytes += self._entry_bytes(entry)
        while self._entries and (len(self._entries) > self.max_entries or self.bytes > self.max_bytes):
            self._forget(*self._entries.popitem(last=False))

    def pin(self, tokens: np.ndarray, rows: Row) -> CachedPrefix:
        """Keep `rows` for `tokens` until `unpin`, outside the bounds; replaces an unpinned entry of the same tokens."""
        key = self._key(tokens)
        if key in self._entries:
            self._forget(key, self._entries.pop(key))
        elif key in self._pinned:
            self._lengths[len(tokens)] -= 1
        entry = self._pinned[key] = CachedPrefix(_read_only(tokens), rows)
        self._lengths[len(tokens)] += 1
        return entry

    def unpin(self, tokens: np.ndarray) -> None:
        if self._pinned.pop(self._key(tokens), None) is not None:
            self._drop_length(len(tokens))

    def _forget(self, key: tuple[str, bytes], entry: CachedPrefix) -> None:
        self.bytes -= self._entry_bytes(entry)
        self._drop_length(len(entry.tokens))

    def _drop_length(self, length: int) -> None:
        self._lengths[length] -= 1
        if not self._lengths[length]:
            del self._lengths[length]

    def _report(self, reused_tokens: int) -> None:
        if self.events is not None:
            self.events.record_prefix_lookup(reused_tokens)


def _read_only(tokens: np.ndarray) -> np.ndarray:
    kept = np.array(tokens, np.int64)
    kept.flags.writeable = False
    return kept
