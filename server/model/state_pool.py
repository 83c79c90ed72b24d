"""The numbers of every session: one array per tensor, a session's share of each is one row.

A batch is then a gather of rows, one model call and a scatter back, with no per-session
arrays to stack; a fork is a row copy and a snapshot or an export is a row's bytes. Rows are
addressed by slot; freed slots are reused, lowest first, before the arrays grow, so that
live rows gather at the front and the arrays can shrink again once most sessions are gone.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import numpy as np

FIRST_CAPACITY = 1024
Row = Mapping[str, np.ndarray]  # one session's rows: tensor name -> [*row_shape] of the tensor's dtype
SMALLEST_CAPACITY = 64  # `shrink` stops here: smaller arrays would save too little memory to be worth a copy


class StatePool:
    """Arrays `[capacity, *row_shape]`, one per named tensor, grown by doubling up to `limit` rows.

    Each array has its tensor's storage dtype (`dtypes`, float32 when not named there): a model whose
    state is float16 holds half the bytes per session, and its rows feed the graph as they are.

    Doubling keeps the copying amortised to one copy per row over the pool's life; freshly grown
    rows are untouched zero pages, so resident memory follows the slots in use, not the capacity.
    Rows once used stay resident, though, until `shrink` gives the unused tail of the arrays back.
    """

    def __init__(self, row_shapes: Mapping[str, tuple[int, ...]], limit: int,
                 dtypes: Mapping[str, str] | None = None):
        self.limit = limit
        capacity = min(limit, FIRST_CAPACITY)
        dtypes = dtypes or {}
        self.arrays = {name: np.zeros((capacity, *shape), dtypes.get(name, np.float32))
                       for name, shape in row_shapes.items()}
        self._free: list[int] = []  # a heap: the lowest free slot first
        self._used = 0  # slots below this have been handed out at least once
        self._in_use = 0

    @property
    def capacity(self) -> int:
        return len(next(iter(self.arrays.values())))

    @property
    def row_bytes(self) -> int:
        return sum(array[0].nbytes for array in self.arrays.values())

    def allocate(self) -> int:
        """A slot whose rows are all zeros: a session that has read nothing yet."""
        self._in_use += 1
        if self._free:
            slot = heapq.heappop(self._free)
            self.zero_row(slot)
            return slot
        if self._used == self.capacity:
            self._grow()
        slot, self._used = self._used, self._used + 1
        return slot

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
        self._in_use -= 1

    def shrink(self) -> bool:
        """Halve the arrays (or more) while at most a quarter of their rows is in use and the upper half is free;
        True when they shrank.

        Half and a quarter leave room to grow again before another copy, so a table whose size
        hovers around a boundary does not copy back and forth. A long-lived session in a high
        slot keeps the arrays long: the heap hands out low slots first, so that becomes rare.
        """
        capacity = self.capacity
        if self._in_use > capacity // 4 or capacity // 2 < SMALLEST_CAPACITY:
            return False
        free = set(self._free)
        end = self._used
        while end and end - 1 in free:
            end -= 1  # the slots at and above `end` are all free
        while capacity // 2 >= max(end, SMALLEST_CAPACITY) and self._in_use <= capacity // 4:
            capacity //= 2
        if capacity == self.capacity:
            return False
        self._used = end
        self._free = [slot for slot in self._free if slot < end]
        heapq.heapify(self._free)
        self._resize(capacity)
        return True

    def _grow(self) -> None:
        if self.capacity >= self.limit:
            raise RuntimeError(f"state pool is full ({self.limit} rows); the session table should have refused")
        self._resize(min(self.limit, 2 * self.capacity))

    def _resize(self, capacity: int) -> None:
        """New arrays of `capacity` rows with the rows handed out so far; the rest are untouched zero pages."""
        for name, old in self.arrays.items():
            resized = np.zeros((capacity, *old.shape[1:]), old.dtype)
            resized[: self._used] = old[: self._used]
            self.arrays[name] = resized

    def gather(self, names: Sequence[str], slots: np.ndarray) -> tuple[np.ndarray, ...]:
        """Copies of the rows at `slots`, one array `[batch, *row_shape]` per name, in order."""
        return tuple(np.take(self.arrays[name], slots, axis=0) for name in names)

    def scatter(self, names: Sequence[str], slots: np.ndarray, values: Sequence[np.ndarray]) -> None:
        """Write `values[i]` (`[batch, *row_shape]`) into the rows at `slots`."""
        for name, value in zip(names, values, strict=True):
            self.arrays[name][slots] = value

    def zero_row(self, slot: int) -> None:
        for array in self.arrays.values():
            array[slot] = 0.0

    def copy_row(self, source: int, target: int) -> None:
        """Make `target` continue exactly where `source` is: a fork."""
        for array in self.arrays.values():
            array[target] = array[source]

    def rows(self, slot: int) -> Row:
        """Copies of every tensor's row at `slot`: a checkpoint, a cache entry, safe to keep while the pool moves on."""
        return {name: array[slot].copy() for name, array in self.arrays.items()}

    def set_rows(self, slot: int, rows: Row | None) -> None:
        """Make `slot` hold `rows` (from `rows`, of this pool's shapes); None for zeros, a session that read nothing."""
        if rows is None:
            self.zero_row(slot)
            return
        for name, array in self.arrays.items():
            array[slot] = rows[name]

    def row(self, name: str, slot: int) -> np.ndarray:
        """A copy of one row of one tensor, safe to keep while the pool moves on."""
        return self.arrays[name][slot].copy()

    def row_to_bytes(self, slot: int) -> bytes:
        """Every tensor's row at `slot`, in name order: what a snapshot or an export carries."""
        return b"".join(self.arrays[name][slot].tobytes() for name in sorted(self.arrays))

    def row_from_bytes(self, slot: int, data: bytes) -> None:
        """The inverse of `row_to_bytes`; raises ValueError when `data` is not one row of this pool."""
        if len(data) != self.row_bytes:
            raise ValueError(f"a row of this pool is {self.row_bytes} bytes, got {len(data)}")
        offset = 0
        for name in sorted(self.arrays):
            array = self.arrays[name]
            array[slot] = np.frombuffer(data, array.dtype, array[0].size, offset).reshape(array.shape[1:])
            offset += array[0].nbytes
