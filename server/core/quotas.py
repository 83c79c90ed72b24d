"""Sessions held per owner, and the most one owner may hold: so that one identity cannot fill the table.

Counted when a session is added or removed, never per step, so the cap costs nothing per token.
The session table asks `check` before it makes room for a session, so that an owner at its cap
is refused before anyone's session, its own included, is evicted for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rnnserve.server.core.errors import IdentityQuotaExhausted


class OwnerQuota:
    def __init__(self, limit: int):
        self.limit = limit  # 0: no cap
        self._held: Counter[str] = Counter()

    def check(self, owner: str) -> None:
        """Refuse a session of `owner` when it already holds `limit`."""
        if self.limit and self._held[owner] >= self.limit:
            raise IdentityQuotaExhausted(self.limit)

    def added(self, owner: str) -> None:
        self._held[owner] += 1

    def removed(self, owner: str) -> None:
        self._held[owner] -= 1
        if not self._held[owner]:
            del self._held[owner]  # so that the counts follow the owners holding sessions now

    def admitted(self, owners: Sequence[str]) -> list[int]:
        """The indices of `owners`, sessions about to be added in this order, that fit under the cap."""
        if not self.limit:
            return list(range(len(owners)))
        adding: Counter[str] = Counter()
        fitting = []
        for index, owner in enumerate(owners):
            if self._held[owner] + adding[owner] < self.limit:
                adding[owner] += 1
                fitting.append(index)
        return fitting
