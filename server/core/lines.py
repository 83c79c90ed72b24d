"""A session's line: its work admitted one item at a time, in arrival order.

Steps of one session must apply once each and in the order they arrived, whichever calls or
streams carry them. Rather than a lock per call (a task per step to wait on it), each session
has a line: work that finds the line free is admitted at once, in the caller's own frame;
the rest waits and is admitted by whoever finishes the item before it.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

Item = TypeVar("Item")


class Line(Generic[Item]):
    __slots__ = ("busy", "_waiting")

    def __init__(self) -> None:
        self.busy = False
        self._waiting: deque[Item] | None = None  # made on first contention: most sessions never need one

    def enter(self, item: Item) -> bool:
        """True when `item` is admitted now; False when it waits behind the work in progress."""
        if not self.busy:
            self.busy = True
            return True
        if self._waiting is None:
            self._waiting = deque()
        self._waiting.append(item)
        return False

    def leave(self) -> Item | None:
        """End the admitted item; return the next one, now admitted, or None when the line is free."""
        if not self._waiting:
            self.busy = False
            return None
        item = self._waiting.popleft()
        if not self._waiting:
            self._waiting = None
        return item
