"""The state pool: rows by slot, reused before growing, gathered and scattered in place."""

import numpy as np
import pytest

from rnnserve.server.model import state_pool
from rnnserve.server.model.state_pool import StatePool

ROWS = {"h": (2, 3), "c": (2, 3), "next_logits": (5,)}


def filled(pool: StatePool, slot: int, value: float) -> None:
    pool.scatter(list(ROWS), np.array([slot]), [np.full((1, *shape), value, np.float32) for shape in ROWS.values()])


def test_allocated_rows_start_at_zero_even_when_reused():
    pool = StatePool(ROWS, limit=4)
    slot = pool.allocate()
    filled(pool, slot, 7.0)
    pool.free(slot)
    assert pool.allocate() == slot
    assert all(not array[slot].any() for array in pool.arrays.values())


def test_gather_and_scatter_address_rows_by_slot():
    pool = StatePool(ROWS, limit=8)
    slots = [pool.allocate() for _ in range(4)]
    for slot in slots:
        filled(pool, slot, float(slot))
    h, c = pool.gather(["h", "c"], np.array([slots[2], slots[0]]))  # [batch, layers, hidden] each
    assert h.shape == (2, 2, 3) and (h[0] == slots[2]).all() and (c[1] == slots[0]).all()
    pool.scatter(["h"], np.array([slots[1]]), [np.full((1, 2, 3), -1.0, np.float32)])
    assert (pool.arrays["h"][slots[1]] == -1).all() and (pool.arrays["c"][slots[1]] == slots[1]).all()


def test_growing_keeps_rows_and_stops_at_the_limit(monkeypatch):
    monkeypatch.setattr(state_pool, "FIRST_CAPACITY", 2)
    pool = StatePool(ROWS, limit=5)
    slots = [pool.allocate() for _ in range(5)]
    for slot in slots:
        filled(pool, slot, slot + 1.0)
    assert pool.capacity == 5 and len(set(slots)) == 5
    assert [float(pool.arrays["c"][slot, 0, 0]) for slot in slots] == [1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(RuntimeError, match="full"):
        pool.allocate()


def test_copy_row_forks_and_bytes_round_trip():
    pool = StatePool(ROWS, limit=4)
    source, fork, restored = pool.allocate(), pool.allocate(), pool.allocate()
    pool.scatter(list(ROWS), np.array([source]),
                 [np.random.default_rng(0).standard_normal((1, *s)).astype(np.float32) for s in ROWS.values()])
    pool.copy_row(source, fork)
    pool.row_from_bytes(restored, pool.row_to_bytes(source))
    for array in pool.arrays.values():
        assert np.array_equal(array[fork], array[source]) and np.array_equal(array[restored], array[source])
    assert len(pool.row_to_bytes(source)) == pool.row_bytes == 4 * (6 + 6 + 5)
    with pytest.raises(ValueError, match="bytes"):
        pool.row_from_bytes(restored, b"\0" * 3)


def test_shrink_gives_back_the_free_tail_and_keeps_live_rows(monkeypatch):
    monkeypatch.setattr(state_pool, "FIRST_CAPACITY", 2)
    monkeypatch.setattr(state_pool, "SMALLEST_CAPACITY", 2)
    pool = StatePool(ROWS, limit=64)
    slots = [pool.allocate() for _ in range(16)]
    for slot in slots:
        filled(pool, slot, slot + 1.0)
    for slot in slots[3:]:
        pool.free(slot)
    assert pool.shrink()
    assert pool.capacity == 8  # halved once: 3 rows in use would fill more than half of 4
    assert [float(pool.arrays["h"][slot, 0, 0]) for slot in slots[:3]] == [1.0, 2.0, 3.0]
    pool.free(slots[0])
    assert [pool.allocate() for _ in range(3)] == [0, 3, 4]  # the lowest free slot first, then growth


def test_a_live_row_near_the_end_keeps_the_arrays(monkeypatch):
    monkeypatch.setattr(state_pool, "FIRST_CAPACITY", 2)
    monkeypatch.setattr(state_pool, "SMALLEST_CAPACITY", 2)
    pool = StatePool(ROWS, limit=64)
    slots = [pool.allocate() for _ in range(16)]
    for slot in slots[:-1]:
        pool.free(slot)
    assert not pool.shrink()
    assert pool.capacity == 16
