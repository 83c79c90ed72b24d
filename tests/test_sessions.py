"""The session table: ids, owners, removal reasons, the cap, expiry and exact-retry records."""

import time

import numpy as np
import pytest

from rnnserve.server.core.batcher import StepAnswer
from rnnserve.server.core.errors import (CapacityExhausted, IdentityQuotaExhausted, InvalidArgument, PositionMismatch,
                                         SessionEvicted, SessionExpired, SessionNotFound)
from rnnserve.server.core.prediction import Prediction
from rnnserve.server.core.sessions import Removal, Session, SessionTable
from rnnserve.server.model.state_pool import StatePool
from serving import table_model


class Table(SessionTable):
    """A session table whose sessions all run one model version, holding only a pool."""

    def __init__(self, max_sessions: int, **options):
        super().__init__(max_sessions=max_sessions, **options)
        self.model = table_model(StatePool({"h": (1, 2)}, limit=max_sessions))

    def create(self, owner: str, ttl: float) -> Session:
        return super().create(owner, ttl, self.model)


def make_table(max_sessions=4, evict=False, remember=100, per_owner=0) -> Table:
    return Table(max_sessions, evict_when_full=evict, remember_removed=remember, max_sessions_per_owner=per_owner)


def test_a_session_may_take_an_id_a_face_derived_but_never_a_live_ones():
    """A Triton sequence's session takes the id the v2 face derived; while it lives, a second cannot take it (two
    STARTs racing), and once it is closed the id is free again (a new sequence of the same sequence_id)."""
    table = make_table()
    first = SessionTable.create(table, "alice", 60, table.model, session_id="seq-1")
    assert first.id == "seq-1" and table.get("seq-1", "alice") is first
    with pytest.raises(InvalidArgument, match="a live session already has this id"):
        SessionTable.create(table, "alice", 60, table.model, session_id="seq-1")
    assert table.get("seq-1", "alice") is first and len(table) == 1
    table.remove(first, Removal.CLOSED)
    second = SessionTable.create(table, "alice", 60, table.model, session_id="seq-1")
    assert second is not first and table.get("seq-1", "alice") is second


def step(session, tokens, now=None):
    answer = StepAnswer(session.position + len(tokens), Prediction([1], ["a"], [0.5], [-0.7]))
    session.advance(np.array(tokens, np.int64), answer, time.monotonic() if now is None else now)
    return answer


def test_ids_are_random_and_sessions_start_empty():
    table = make_table()
    first, second = table.create("", 60), table.create("", 60)
    assert first.id != second.id and len(first.id) >= 22  # 128 bits, url-safe base64
    assert (first.position, second.position) == (0, 0)
    assert table.get(first.id, "") is first


@pytest.mark.parametrize(("reason", "error"), [(Removal.CLOSED, SessionNotFound), (Removal.EXPIRED, SessionExpired),
                                               (Removal.EVICTED, SessionEvicted)])
def test_removed_sessions_say_why(reason, error):
    table = make_table()
    session = table.create("", 60)
    table.remove(session, reason)
    with pytest.raises(error) as caught:
        table.get(session.id, "")
    assert type(caught.value) is error
    with pytest.raises(error):
        session.ensure_live()


def test_forgotten_removals_and_unknown_ids_are_plain_not_found():
    table = make_table(remember=1)
    old, new = table.create("", 60), table.create("", 60)
    table.remove(old, Removal.EXPIRED)
    table.remove(new, Removal.EXPIRED)
    for session_id in (old.id, "never-existed"):
        with pytest.raises(SessionNotFound) as caught:
            table.get(session_id, "")
        assert type(caught.value) is SessionNotFound


def test_another_owners_session_looks_like_none():
    table = make_table()
    session = table.create("alice", 60)
    with pytest.raises(SessionNotFound) as caught:
        table.get(session.id, "bob")
    assert type(caught.value) is SessionNotFound


def test_full_table_refuses_or_evicts_the_least_recently_active():
    refusing = make_table(max_sessions=2)
    refusing.create("", 60), refusing.create("", 60)
    with pytest.raises(CapacityExhausted):
        refusing.create("", 60)

    evicting = make_table(max_sessions=2, evict=True)
    older, newer = evicting.create("", 60), evicting.create("", 30)
    step(older, [1])  # now `newer` (another TTL group) is the least recently active
    evicting.create("", 60)
    with pytest.raises(SessionEvicted):
        evicting.get(newer.id, "")
    assert evicting.get(older.id, "") is older


@pytest.mark.parametrize("evict", [False, True])
def test_an_owner_at_its_cap_is_refused_and_evicts_nobody(evict):
    table = make_table(max_sessions=3, evict=evict, per_owner=2)
    alice = [table.create("alice", 60) for _ in range(2)]
    bob = table.create("bob", 60)
    with pytest.raises(IdentityQuotaExhausted):
        table.create("alice", 60)
    assert all(table.get(s.id, s.owner) is s for s in (*alice, bob)) and len(table) == 3
    table.remove(alice[0], Removal.CLOSED)
    assert table.create("alice", 60).owner == "alice"  # a place of its own, freed by its own close
    # as a restore counts: alice is at her cap, bob has room for one more, carol for two
    assert table.owners.admitted(["alice", "bob", "bob", "alice", "carol"]) == [1, 4]
    expired = make_table(per_owner=1)
    session = expired.create("carol", 1)
    assert expired.expire(time.monotonic() + 2) == 1 and expired.create("carol", 1).owner == "carol"


def test_busy_sessions_are_neither_evicted_nor_expired():
    table = make_table(max_sessions=1, evict=True)
    session = table.create("", 1)
    session.line.enter("work in progress")
    with pytest.raises(CapacityExhausted):
        table.create("", 1)
    assert table.expire(time.monotonic() + 10) == 0


def test_sweep_expires_per_ttl_in_order_of_activity():
    table = make_table()
    now = time.monotonic()
    short, long, active = table.create("", 10), table.create("", 100), table.create("", 10)
    step(active, [1], now + 8)
    assert table.expire(now + 11) == 1
    with pytest.raises(SessionExpired):
        table.get(short.id, "")
    assert table.get(long.id, "") is long and table.get(active.id, "") is active
    assert table.expire(now + 101) == 2 and len(table) == 0


def test_expired_session_is_refused_on_access_before_any_sweep():
    table = make_table()
    session = table.create("", 60)
    session.last_active -= 61
    with pytest.raises(SessionExpired):
        table.get(session.id, "")
    assert len(table) == 0


def test_exact_retry_replays_and_anything_else_mismatches():
    table = make_table()
    session = table.create("", 60)
    step(session, [1, 2])
    answer = step(session, [3])
    assert session.replay(2, np.array([3])) is answer
    for expected, tokens in [(2, [4]), (0, [1, 2]), (7, [3])]:
        with pytest.raises(PositionMismatch) as caught:
            session.replay(expected, np.array(tokens))
        assert caught.value.actual == 3
