"""Session lifecycle on a live server: idle time-to-live, its limit, the cap and its two policies.

Time-to-live is whole seconds on the wire, so the shortest is 1 s; a fast sweep (50 ms) keeps
each wait just over it.
"""

import time

import grpc
import numpy as np
import pytest

from rnnserve.server.core import sessions
from rnnserve.server.core.batcher import StepAnswer
from rnnserve.server.core.prediction import Prediction
from rnnserve.server.core.sessions import Session, SessionTable
from rnnserve.server.model.state_pool import StatePool
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import assert_fails, create, position, table_model

FAST_SWEEP = 0.05


def inference(running) -> tuple[grpc.Channel, rnnserve_pb2_grpc.InferenceStub]:
    channel = grpc.insecure_channel(running.address)
    return channel, rnnserve_pb2_grpc.InferenceStub(channel)


def idle_seconds(session: pb.Session) -> float:
    return (session.expires.ToNanoseconds() - session.last_active.ToNanoseconds()) / 1e9


def test_a_session_may_ask_for_any_ttl_up_to_the_server_maximum(start_server):
    channel, stub = inference(start_server(default_ttl_seconds=2, max_ttl_seconds=5))
    with channel:
        assert idle_seconds(stub.CreateSession(pb.CreateSessionRequest()).session) == pytest.approx(2)
        assert idle_seconds(stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=5)).session) == pytest.approx(5)
        error, _ = assert_fails(lambda: create(stub, ttl_seconds=6), grpc.StatusCode.INVALID_ARGUMENT,
                                "INVALID_ARGUMENT", "ttl_seconds")
        assert "at most 5" in error.details()


def test_an_idle_session_is_freed_by_the_sweep_and_then_says_it_expired(start_server):
    running = start_server(sweep_seconds=FAST_SWEEP)
    channel, stub = inference(running)
    with channel:
        idle, active = create(stub, ttl_seconds=1), create(stub, ttl_seconds=1)
        for _ in range(3):  # 1.2 s in all, never 1 s idle: the time-to-live counts from the last activity
            time.sleep(0.4)
            stub.Step(pb.StepRequest(session_id=active, text="a"))
        assert len(running.engine.table) == 1  # freed without anyone asking for it
        error, info = assert_fails(lambda: stub.Step(pb.StepRequest(session_id=idle, text="a")),
                                   grpc.StatusCode.NOT_FOUND, "SESSION_EXPIRED")
        assert "expired" in error.details() and info.metadata["session_id"] == idle
        assert position(stub, active) == 3


def test_a_full_table_evicts_the_least_recently_active_and_says_so(start_server):
    channel, stub = inference(start_server(max_sessions=2, when_full="evict-oldest"))
    with channel:
        older, newer = create(stub), create(stub)
        stub.Step(pb.StepRequest(session_id=older, text="a"))  # now `newer` is the least recently active
        create(stub)
        error, _ = assert_fails(lambda: position(stub, newer), grpc.StatusCode.NOT_FOUND, "SESSION_EVICTED")
        assert "evicted" in error.details()
        assert position(stub, older) == 1


def test_a_full_table_that_refuses_keeps_every_session_until_one_leaves(start_server):
    channel, stub = inference(start_server(max_sessions=2, when_full="refuse"))
    with channel:
        held = [create(stub, prompt_text="ab"), create(stub)]
        error, _ = assert_fails(lambda: create(stub), grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED")
        assert "full (2 sessions)" in error.details()
        assert position(stub, held[0]) == 2
        stub.CloseSession(pb.CloseSessionRequest(session_id=held[1]))
        create(stub)


def test_expiry_costs_nothing_per_token(monkeypatch):
    """A step never looks at expiry; the sweep reads one session per TTL group when none has expired."""
    table = SessionTable(max_sessions=10_000, evict_when_full=False, remember_removed=10)
    model = table_model(StatePool({"h": (1, 2)}, limit=10_000))
    held = [table.create("", ttl, model) for ttl in (60, 120) for _ in range(5_000)]
    reads = []
    expires = Session.expires
    monkeypatch.setattr(sessions.Session, "expires", property(lambda session: reads.append(1) or expires.fget(session)))
    held[0].advance(np.array([1]), StepAnswer(1, Prediction([1], ["a"], [0.5], [-0.7])), time.monotonic())
    assert reads == []
    table.get(held[1].id, "")  # refusing an expired session on access costs one read per call, not per session
    assert len(reads) == 1
    reads.clear()
    assert table.expire(time.monotonic()) == 0 and len(reads) == 2


def test_sessions_held_add_no_tasks_to_the_server(start_server):
    running = start_server()
    before = running.task_count()
    channel, stub = inference(running)
    with channel:
        for _ in range(200):
            create(stub, prompt_text="fox", ttl_seconds=60)
    deadline = time.monotonic() + 5
    while running.task_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)  # the last call's handler task ends just after its reply arrived
    # grpc keeps a few tasks of its own per connection, coming and going; a task per session would be 200.
    assert len(running.engine.table) == 200 and running.task_count() - before < 10
