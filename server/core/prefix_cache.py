"""The prefix-state cache: the state after a prompt, kept so that a new session with that prompt skips reading it.

A recurrent model's state after a prompt is one row of a few KiB, whatever the prompt's length,
so a cached 1,000-token prompt costs a copy of that row instead of a model call over 1,000
tokens. Entries are keyed by the prompt's exact tokens (compared as bytes, so no two prompts can
share an entry) and found by the longest cached prefix of a new prompt: the rest of the prompt
is read from there.

A hit answers faster and says how many tokens it reused, so whoever can hit an entry learns that
its prompt was read before. The cache is therefore split into partitions: under the scope
IDENTITY each identity has its own, and a lookup sees only its identity's partition and the
shared one (states shipped in the bundle or registered for everyone through Admin, whose prompts
every caller can list anyway); under the scope GLOBAL, for a deployment with one trusted tenant,
every identity shares one. Each partition has its own bounds (`max_entries`, `max_bytes`, least
recently used first), so one identity's prompts never evict another's; at most `max_partitions`
identities hold entries at once, and the prompts of any further identity are not cached (a
capacity refusal: it learns that many identities cached prompts, nothing about which or what).
An entry unused for `idle_seconds` expires, by time alone and never for another's sake, and a
partition left with nothing makes room for another identity. Pinned entries (named states) stay
until unpinned and count toward no bound.

Results are the same as reading the prompt: an entry is the very state (and next-token logits)
a cold read of the same tokens produced.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rnnserve.server.model.state_pool import Row

IDENTITY, GLOBAL = "identity", "global"
SCOPES = (IDENTITY, GLOBAL)
EVERYONE = None  # the partition of states for everyone; no identity is None, so none can claim it


class CacheEvents(Protocol):
    """Where the cache reports lookups, for metrics."""

    def record_prefix_lookup(self, reused_tokens: int) -> None: ...


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    tokens: np.ndarray  # [time] int64, read-only
    rows: Row  # the state and next-token logits after `tokens`, never written once cached


@dataclass
class _Partition:
    """One identity's entries (or everyone's, for the shared partition and under the scope GLOBAL)."""

    entries: OrderedDict[bytes, CachedPrefix] = field(default_factory=OrderedDict)  # least recently used first
    used: dict[bytes, float] = field(default_factory=dict)  # each entry's last use, time.monotonic()
    pinned: dict[bytes, CachedPrefix] = field(default_factory=dict)
    pins: Counter[bytes] = field(default_factory=Counter)  # named states standing for each pinned prompt
    lengths: Counter[int] = field(default_factory=Counter)  # prompt lengths held, so a lookup tries only those
    bytes: int = 0

    def __len__(self) -> int:
        return len(self.entries) + len(self.pinned)

    def find(self, key: bytes) -> CachedPrefix | None:
        entry = self.pinned.get(key)
        if entry is None and (entry := self.entries.get(key)) is not None:
            self.entries.move_to_end(key)
            self.used[key] = time.monotonic()
        return entry

    def pop_oldest(self) -> CachedPrefix:
        """Remove the least recently used entry (the caller keeps `bytes`)."""
        key, entry = self.entries.popitem(last=False)
        del self.used[key]
        self.drop_length(len(entry.tokens))
        return entry

    def drop_length(self, length: int) -> None:
        self.lengths[length] -= 1
        if not self.lengths[length]:
            del self.lengths[length]


class PrefixCache:
    def __init__(self, *, max_entries: int, max_bytes: int, min_tokens: int, row_bytes: int,
                 scope: str = IDENTITY, max_partitions: int = 16, idle_seconds: float = 0.0,
                 events: CacheEvents | None = None):
        """`max_entries` and `max_bytes` bound each partition; `max_partitions` the identities holding entries;
        `idle_seconds` (0: no limit) how long an unused entry stays (see `expire`)."""
        if scope not in SCOPES:
            raise ValueError(f"scope: one of {', '.join(SCOPES)}, not {scope!r}")
        self.scope = scope
        self.max_entries = max_entries
        self.min_tokens = min_tokens  # shorter prompts are not cached (nor counted as misses): a copy saves little
        self.max_bytes = max_bytes
        self.max_partitions = max_partitions
        self.idle_seconds = idle_seconds
        self.row_bytes = row_bytes
        self.events = events
        self._shared = _Partition()
        self._partitions: dict[str, _Partition] = {}

    def __len__(self) -> int:
        return len(self._shared) + sum(len(partition) for partition in self._partitions.values())

    @property
    def bytes(self) -> int:
        """Memory held by evictable entries, every partition together (for metrics)."""
        return sum(partition.bytes for partition in self._partitions.values())

    def _name(self, owner: str | None) -> str | None:
        """The partition `owner`'s entries go in: its own under IDENTITY, the one of all under GLOBAL."""
        if owner is EVERYONE:
            return EVERYONE
        return owner if self.scope == IDENTITY else ""

    def _partition(self, owner: str | None, *, make: bool = False) -> _Partition | None:
        """`owner`'s partition; made when `make` and there is room for one more; None otherwise."""
        name = self._name(owner)
        if name is EVERYONE:
            return self._shared
        partition = self._partitions.get(name)
        if partition is None and make and len(self._partitions) < self.max_partitions:
            partition = self._partitions[name] = _Partition()
        return partition

    def _entry_bytes(self, entry: CachedPrefix) -> int:
        return self.row_bytes + entry.tokens.nbytes

    def longest_prefix(self, owner: str, tokens: np.ndarray) -> CachedPrefix | None:
        """The entry of the longest prefix of `tokens` (all of them included) that `owner` may hit, None when none
        is cached: what others cached (outside the shared partition) is never looked at."""
        own = self._partition(owner)
        partitions = [self._shared] if own is None else [own, self._shared]
        lengths = {length for partition in partitions for length in partition.lengths if length <= len(tokens)}
        for length in sorted(lengths, reverse=True):
            key = tokens[:length].tobytes()
            for partition in partitions:
                if (entry := partition.find(key)) is not None:
                    self._report(length)
                    return entry
        if len(tokens) >= self.min_tokens:
            self._report(0)
        return None

    def put(self, owner: str, tokens: np.ndarray, rows: Row) -> None:
        """Remember `rows` as the state after `owner`'s `tokens`, then evict `owner`'s own down to the bounds."""
        if not self.max_entries or len(tokens) < self.min_tokens:
            return
        partition = self._partition(owner, make=True)
        key = tokens.tobytes()
        if partition is None or key in partition.pinned or key in partition.entries:
            return
        entry = partition.entries[key] = CachedPrefix(_read_only(tokens), rows)
        partition.used[key] = time.monotonic()
        partition.lengths[len(tokens)] += 1
        partition.bytes += self._entry_bytes(entry)
        while partition.entries and (len(partition.entries) > self.max_entries or partition.bytes > self.max_bytes):
            partition.bytes -= self._entry_bytes(partition.pop_oldest())

    def expire(self, now: float) -> int:
        """Drop the entries unused since `now - idle_seconds` (time.monotonic()), and the partitions left with
        nothing, so that another identity may have one; how many entries went."""
        if not self.idle_seconds:
            return 0
        expired, before = 0, now - self.idle_seconds
        for name, partition in list(self._partitions.items()):
            while partition.entries and partition.used[next(iter(partition.entries))] < before:
                partition.bytes -= self._entry_bytes(partition.pop_oldest())
                expired += 1
            if not partition.entries and not partition.pinned:
                del self._partitions[name]
        return expired

    def pin(self, owner: str | None, tokens: np.ndarray, rows: Row) -> CachedPrefix:
        """Keep `rows` for `owner`'s `tokens` (EVERYONE: for everyone), outside the bounds, until each `pin` of them
        is matched by an `unpin`; takes the place of an unpinned entry of the same tokens. An owner beyond
        `max_partitions` gets the entry, kept nowhere in the cache."""
        entry = CachedPrefix(_read_only(tokens), rows)
        partition = self._partition(owner, make=True)
        if partition is None:
            return entry
        key = entry.tokens.tobytes()
        if (unpinned := partition.entries.pop(key, None)) is not None:
            del partition.used[key]
            partition.bytes -= self._entry_bytes(unpinned)
        elif key not in partition.pinned:
            partition.lengths[len(tokens)] += 1
        entry = partition.pinned.setdefault(key, entry)  # the same tokens read from zeros: the same rows
        partition.pins[key] += 1
        return entry

    def unpin(self, owner: str | None, tokens: np.ndarray) -> None:
        """Undo one `pin` of `tokens`; the entry goes with the last."""
        partition, key = self._partition(owner), tokens.tobytes()
        if partition is None or key not in partition.pinned:
            return
        partition.pins[key] -= 1
        if not partition.pins[key]:
            del partition.pins[key], partition.pinned[key]
            partition.drop_length(len(tokens))

    def _report(self, reused_tokens: int) -> None:
        if self.events is not None:
            self.events.record_prefix_lookup(reused_tokens)


def _read_only(tokens: np.ndarray) -> np.ndarray:
    kept = np.array(tokens, np.int64)
    kept.flags.writeable = False
    return kept
