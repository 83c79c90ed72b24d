"""Sessions between replicas through a real redis-server: hibernation, wake-up, hand-off, fencing, faults."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from rnnserve.bundle import Bundle
from rnnserve.server.app import STORE_HEALTH_NAME
from rnnserve.server.settings import Settings
from rnnserve.server.store.session_store import RELEASE_PREFIX, REPLICA_PREFIX, SESSION_PREFIX
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from redis_process import RedisProcess
from serving import RunningServer, assert_fails, create

pytestmark = pytest.mark.every_model

LOOPBACK = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "sweep_seconds": 0.05,
            "redis_lease_seconds": 1.0, "redis_timeout_seconds": 0.5}


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path) as process:
        yield process


class Replica:
    """A server sharing the test's Redis, with a channel and stub to it; `stop` drains it as SIGTERM does."""

    def __init__(self, bundle: Bundle, settings: Settings):
        self.running = RunningServer(bundle, settings)
        self.channel = grpc.insecure_channel(self.running.address)
        self.stub = rnnserve_pb2_grpc.InferenceStub(self.channel)
        self.stopped = False

    @property
    def held(self) -> int:
        return len(self.running.engine.table)

    def store_health(self) -> int:
        request = health_pb2.HealthCheckRequest(service=STORE_HEALTH_NAME)
        return health_pb2_grpc.HealthStub(self.channel).Check(request).status

    def stop(self, grace: float = 0.0) -> None:
        if not self.stopped:
            self.stopped = True
            self.channel.close()
            self.running.stop(grace)


@pytest.fixture
def replicas(bundle: Bundle, redis_server: RedisProcess) -> Iterator[Callable[..., Replica]]:
    started: list[Replica] = []

    def start(**overrides) -> Replica:
        replica = Replica(bundle, Settings(**{**LOOPBACK, "redis_url": redis_server.url, **overrides}))
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop()


def ids(text: str) -> list[int]:
    """One id per character, valid in every served vocabulary: positions are then the texts' lengths in any model."""
    return [ord(character) % 40 for character in text]


def step(stub, session_id: str, text: str, expected: int) -> pb.StepResponse:
    return stub.Step(pb.StepRequest(session_id=session_id, token_ids=ids(text), top_k=3, expected_position=expected))


def export(stub, session_id: str) -> bytes:
    return stub.ExportSession(pb.ExportSessionRequest(session_id=session_id)).state


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_idle_session_hibernates_and_wakes_bit_exact_on_another_replica(replicas):
    a = replicas(hibernate_after_seconds=0.3)
    b = replicas(hibernate_after_seconds=0)
    session_id = create(a.stub, prompt_token_ids=ids("The quick"))
    step(a.stub, session_id, " brown", len("The quick"))
    before = export(a.stub, session_id)
    wait_until(lambda: a.held == 0)  # the slot is freed once the state is in Redis
    assert export(b.stub, session_id) == before  # woken on b: the same bytes, history and token log included
    assert b.held == 1
    answer = step(b.stub, session_id, " fox", len("The quick brown"))
    assert answer.position == len("The quick brown fox")


def test_a_session_asked_for_elsewhere_is_handed_over_never_live_twice(replicas):
    a = replicas(hibernate_after_seconds=0)
    b = replicas(hibernate_after_seconds=0)
    session_id = create(a.stub, prompt_token_ids=ids("abc"))
    before = export(a.stub, session_id)
    assert export(b.stub, session_id) == before  # b asked a for it: a put it at rest, b took it
    assert (a.held, b.held) == (0, 1)
    step(a.stub, session_id, "d", 3)  # and back: routing may send it anywhere, it is live in one place
    assert (a.held, b.held) == (1, 0)
    a.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    store = redis.Redis.from_url(a.running.engine.settings.redis_url)
    wait_until(lambda: not store.exists(SESSION_PREFIX + session_id))  # closed everywhere
    assert_fails(lambda: step(b.stub, session_id, "e", 4), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")


def test_forks_and_imports_are_found_from_any_replica(replicas):
    a = replicas(hibernate_after_seconds=0)
    b = replicas(hibernate_after_seconds=0)
    source = create(a.stub, prompt_token_ids=ids("abc"))
    (fork,) = a.stub.ForkSession(pb.ForkSessionRequest(session_id=source, count=1)).sessions
    imported = a.stub.ImportSession(pb.ImportSessionRequest(state=export(a.stub, source))).session
    for made in (fork, imported):  # routed by its own id, it may be asked for on another replica first
        assert step(b.stub, made.session_id, "d", 3).position == 4
    assert (a.held, b.held) == (1, 2)


def test_a_second_owner_is_refused_not_merged(replicas):
    a = replicas(hibernate_after_seconds=0, write_through_every=1)
    session_id = create(a.stub, prompt_token_ids=ids("abc"))
    store = redis.Redis.from_url(a.running.engine.settings.redis_url)
    # Another replica took the session (as after a lapse of a's lease) and is alive, deaf to requests.
    store.hset(SESSION_PREFIX + session_id, "holder", "intruder/1")
    store.set(REPLICA_PREFIX + "intruder/1", b"1", px=60_000)
    # The step runs on a's copy, but its write is refused: the step is refused with it, and the copy goes.
    assert_fails(lambda: step(a.stub, session_id, "d", 3), grpc.StatusCode.UNAVAILABLE)
    wait_until(lambda: a.held == 0)
    error, _ = assert_fails(lambda: step(a.stub, session_id, "e", 4), grpc.StatusCode.UNAVAILABLE)
    assert "is live on replica intruder/1" in error.details()
    assert store.hget(SESSION_PREFIX + session_id, "holder") == b"intruder/1"


def test_another_callers_session_does_not_exist_in_the_store_either(replicas, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token-0123456789 alice\nbob-token-0123456789ab bob\n")
    a = replicas(hibernate_after_seconds=0.2, auth_tokens_file=tokens)
    b = replicas(hibernate_after_seconds=0, auth_tokens_file=tokens)
    alice, bob = [(("authorization", f"Bearer {name}-token-0123456789{tail}"),) for name, tail in
                  (("alice", ""), ("bob", "ab"))]
    session_id = a.stub.CreateSession(pb.CreateSessionRequest(prompt_token_ids=ids("abc")), metadata=alice).session.session_id
    wait_until(lambda: a.held == 0)
    assert_fails(lambda: b.stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=bob),
                 grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert b.held == 0
    assert b.stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=alice).position == 3


def test_a_drained_replica_hands_every_session_over(replicas):
    a = replicas(hibernate_after_seconds=0)
    b = replicas(hibernate_after_seconds=0)
    prompts = [f"session {i}" for i in range(20)]
    sessions = [create(a.stub, prompt_token_ids=ids(prompt)) for prompt in prompts]
    blobs = [export(a.stub, session_id) for session_id in sessions]
    a.stop()
    assert [export(b.stub, session_id) for session_id in sessions] == blobs
    for session_id, prompt in zip(sessions, prompts):
        assert step(b.stub, session_id, "!", len(prompt)).position == len(prompt) + 1


def test_steps_arriving_during_a_drain_are_refused_retryable(replicas):
    a = replicas(hibernate_after_seconds=0)
    session_id = create(a.stub, prompt_token_ids=ids("abc"))
    a.running.engine.drain()
    error, info = assert_fails(lambda: step(a.stub, session_id, "d", 3), grpc.StatusCode.UNAVAILABLE)
    assert info.reason == "SHUTTING_DOWN"


@pytest.mark.parametrize("every", [1, 4])
def test_write_through_stores_the_session_every_n_tokens(replicas, every):
    a = replicas(hibernate_after_seconds=0, write_through_every=every)
    session_id = create(a.stub, prompt_token_ids=ids("ab"))
    store = redis.Redis.from_url(a.running.engine.settings.redis_url)
    for position in range(2, 12):
        step(a.stub, session_id, "c", position)  # answered once the store has what it must
        stored = a.running.engine.operations.decode(store.hget(SESSION_PREFIX + session_id, "state"))[1].position
        assert stored == max(2, (position + 1) // every * every)  # the prompt's state was stored at creation


def test_with_redis_down_held_sessions_serve_and_nothing_partial_is_answered(replicas, redis_server):
    a = replicas(hibernate_after_seconds=0.3, write_through_every=1)  # write-through steps do not wait for it
    held = create(a.stub, prompt_token_ids=ids("held"))
    resting = create(a.stub, prompt_token_ids=ids("resting"))
    wait_until(lambda: a.held == 0)
    held_position = a.stub.GetSession(pb.GetSessionRequest(session_id=held)).position  # woken again
    redis_server.stop()
    for position in range(held_position, held_position + 5):
        step(a.stub, held, "x", position)  # served from memory
    wait_until(lambda: a.store_health() == health_pb2.HealthCheckResponse.NOT_SERVING)
    error, _ = assert_fails(lambda: step(a.stub, resting, "x", len("resting")), grpc.StatusCode.UNAVAILABLE)
    assert "session store" in error.details()
    time.sleep(0.5)  # hibernation pauses: the idle session stays here, serving
    assert a.held == 1
    redis_server.start()
    wait_until(lambda: a.store_health() == health_pb2.HealthCheckResponse.SERVING)


def test_after_its_lease_lapsed_a_replica_drops_the_sessions_taken_meanwhile(replicas):
    a = replicas(hibernate_after_seconds=0)
    kept, taken = create(a.stub, prompt_token_ids=ids("kept")), create(a.stub, prompt_token_ids=ids("taken"))
    store = redis.Redis.from_url(a.running.engine.settings.redis_url)
    wait_until(lambda: store.exists(SESSION_PREFIX + taken))  # registered
    holder = store.hget(SESSION_PREFIX + taken, "holder").decode()
    store.delete(REPLICA_PREFIX + holder)  # a's lease lapsed (a stall, a partition)...
    store.hset(SESSION_PREFIX + taken, "holder", "intruder/1")  # ...and another replica took one of its sessions
    store.set(REPLICA_PREFIX + "intruder/1", b"1", px=60_000)
    wait_until(lambda: a.held == 1)  # found at a's next renewal
    assert step(a.stub, kept, "!", len("kept")).position == len("kept!")
    error, _ = assert_fails(lambda: step(a.stub, taken, "!", len("taken")), grpc.StatusCode.UNAVAILABLE)
    assert "intruder/1" in error.details()


def test_waking_respects_the_session_cap_and_leaves_the_session_at_rest(replicas):
    a = replicas(hibernate_after_seconds=0.2)
    b = replicas(hibernate_after_seconds=0, max_sessions=1)
    resting = create(a.stub, prompt_token_ids=ids("resting"))
    wait_until(lambda: a.held == 0)
    create(b.stub, prompt_token_ids=ids("full"))
    assert_fails(lambda: step(b.stub, resting, "!", len("resting")), grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "CAPACITY_EXHAUSTED")
    assert step(a.stub, resting, "!", len("resting")).position == len("resting!")  # given back whole


def test_serving_without_redis_loads_no_redis_client():
    code = ("import sys, asyncio; from rnnserve.server.app import create_server; from rnnserve.server.settings import "
            "Settings\nasync def main():\n    server, _ = create_server(Settings(listen='127.0.0.1:0'))\n"
            "asyncio.run(main()); print(sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'hiredis')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def retry_delay(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay of a failed call, in seconds; None without one."""
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


def test_a_session_the_store_lost_in_a_restart_answers_session_lost(replicas, redis_server):
    a = replicas(hibernate_after_seconds=0.3, write_through_every=1)
    b = replicas(hibernate_after_seconds=0)
    resting = create(a.stub, prompt_token_ids=ids("resting"))
    wait_until(lambda: a.held == 0)
    live = create(a.stub, prompt_token_ids=ids("live"))
    redis_server.stop()
    redis_server.start()  # empty: it persists nothing
    store = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: store.hexists(SESSION_PREFIX + resting, "lost"))  # a marked what it had put there
    wait_until(lambda: store.hexists(SESSION_PREFIX + live, "state"))  # and wrote its live session again at once
    wait_until(lambda: b.store_health() == health_pb2.HealthCheckResponse.SERVING)
    for replica in (a, b):  # whichever replica is asked, the answer is the same
        error, info = assert_fails(lambda: step(replica.stub, resting, "!", len("resting")),
                                   grpc.StatusCode.NOT_FOUND, "SESSION_LOST")
        assert info.metadata["last_replica"] == a.running.engine.hibernation.store.holder
        assert info.metadata["last_position"] == str(len("resting"))
        assert "restarted without it" in error.details()
    assert_fails(lambda: step(b.stub, "no-such-session", "!", 0), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert a.running.engine.metrics.registry.get_sample_value("rnnserve_sessions_lost_total") == 1
    holder = a.running.engine.hibernation.store.holder
    wait_until(lambda: store.pubsub_numsub(RELEASE_PREFIX + holder)[0][1] == 1)  # a listens for requests again
    assert step(b.stub, live, "!", len("live")).position == len("live!")  # handed over from a, whole


def test_a_session_registered_by_a_replica_that_died_before_storing_it_answers_session_lost(replicas):
    a = replicas(hibernate_after_seconds=0)  # no write-through: sessions are registered, their state kept here
    session_id = create(a.stub, prompt_token_ids=ids("abc"))
    store = redis.Redis.from_url(a.running.engine.settings.redis_url)
    wait_until(lambda: store.exists(SESSION_PREFIX + session_id))
    fields = store.hgetall(SESSION_PREFIX + session_id)
    orphan = "orphan-" + session_id  # the same registration, by a replica that has no lease any more
    store.hset(SESSION_PREFIX + orphan, mapping={**fields, b"holder": b"dead/1"})
    _, info = assert_fails(lambda: step(a.stub, orphan, "d", 3), grpc.StatusCode.NOT_FOUND, "SESSION_LOST")
    assert info.metadata["last_replica"] == "dead/1" and info.metadata["last_position"] == "3"


def test_a_session_of_a_dead_replica_is_retried_after_its_lease(replicas):
    a = replicas(hibernate_after_seconds=0, write_through_every=1)
    session_id = create(a.stub, prompt_token_ids=ids("abc"))
    store = redis.Redis.from_url(a.running.engine.settings.redis_url)
    store.hset(SESSION_PREFIX + session_id, "holder", "dead/1")  # held by a replica killed, its lease not lapsed
    store.set(REPLICA_PREFIX + "dead/1", b"1", px=6_000)
    assert_fails(lambda: step(a.stub, session_id, "d", 3), grpc.StatusCode.UNAVAILABLE)  # its write is refused
    wait_until(lambda: a.held == 0)  # and the stale copy goes
    error, _ = assert_fails(lambda: step(a.stub, session_id, "d", 3), grpc.StatusCode.UNAVAILABLE)
    assert "dead/1" in error.details()
    assert 4.0 < retry_delay(error) <= 6.5  # the lease's time left: a client that waits that long finds it free


def test_a_drain_while_the_store_is_down_retries_until_it_is_back(replicas, redis_server, caplog):
    caplog.set_level(logging.INFO, logger="rnnserve.server.store.hibernation")
    a = replicas(hibernate_after_seconds=0, write_through_every=1)
    b = replicas(hibernate_after_seconds=0)
    sessions = [create(a.stub, prompt_token_ids=ids(f"session {i}")) for i in range(6)]
    blobs = [export(a.stub, session_id) for session_id in sessions]
    redis_server.stop()
    draining = threading.Thread(target=a.stop, args=(10.0,))
    draining.start()
    time.sleep(1.0)
    redis_server.start()  # empty: only the drain's retries can save the sessions
    draining.join(30)
    assert "handed 6 sessions to the session store" in caplog.text and "0 could not be handed over" in caplog.text
    assert [export(b.stub, session_id) for session_id in sessions] == blobs


def test_a_store_that_persists_nothing_is_warned_of_at_start(replicas, redis_server, caplog):
    caplog.set_level(logging.INFO, logger="rnnserve.server.store.hibernation")
    a = replicas(hibernate_after_seconds=0)
    wait_until(lambda: "persists nothing" in caplog.text)
    redis.Redis.from_url(redis_server.url).config_set("appendonly", "yes")
    caplog.clear()
    b = replicas(hibernate_after_seconds=0)
    wait_until(lambda: b.running.engine.hibernation.incarnation != "")
    assert "persists nothing" not in caplog.text
    assert "persists sessions: appendonly yes, appendfsync everysec" in caplog.text
    assert a.held == b.held == 0


def test_a_session_whose_put_at_rest_the_store_lost_is_not_stuck_with_its_old_holder(replicas):
    a = replicas(hibernate_after_seconds=0.3, write_through_every=1)
    b = replicas(hibernate_after_seconds=0)
    session_id = create(a.stub, prompt_token_ids=ids("abc"))
    before = export(a.stub, session_id)
    wait_until(lambda: a.held == 0)
    store = redis.Redis.from_url(a.running.engine.settings.redis_url)
    # An append-only file that lost the last second kept the write-through copy, which names a its holder.
    store.hset(SESSION_PREFIX + session_id, "holder", a.running.engine.hibernation.store.holder)
    assert export(b.stub, session_id) == before  # b asked a, which holds nothing, and put it at rest as stored
    assert (a.held, b.held) == (0, 1)


def test_a_store_that_refuses_config_and_info_still_tells_its_restart(bundle, tmp_path, caplog):
    """Managed Redis services often rename CONFIG and INFO away: the replica serves, and the marker key alone tells
    it that the store came back empty."""
    caplog.set_level(logging.INFO, logger="rnnserve.server.store.hibernation")
    hidden = ("--rename-command", "CONFIG", "", "--rename-command", "INFO", "")
    with RedisProcess(tmp_path, flags=hidden) as locked:
        replica = Replica(bundle, Settings(**{**LOOPBACK, "redis_url": locked.url, "hibernate_after_seconds": 0.3,
                                              "write_through_every": 1}))
        try:
            resting = create(replica.stub, prompt_token_ids=ids("resting"))
            wait_until(lambda: replica.held == 0)
            assert "refuses CONFIG" in caplog.text and "persists nothing" not in caplog.text
            locked.stop()
            locked.start()
            store = redis.Redis.from_url(locked.url)
            wait_until(lambda: store.hexists(SESSION_PREFIX + resting, "lost"))
            _, info = assert_fails(lambda: step(replica.stub, resting, "!", len("resting")), grpc.StatusCode.NOT_FOUND,
                                   "SESSION_LOST")
            assert info.metadata["last_position"] == str(len("resting"))
        finally:
            replica.stop()


def test_after_a_fault_the_store_gets_what_it_missed_at_once(replicas, redis_server):
    a = replicas(hibernate_after_seconds=0, write_through_every=4)
    before = create(a.stub, prompt_token_ids=ids("abcd"))  # stored at 4
    create(a.stub, prompt_token_ids=ids("untouched"))  # stored, and not stepped: nothing for the store to miss
    registry = a.running.engine.metrics.registry
    writes = registry.get_sample_value("rnnserve_session_store_writes_total")
    redis_server.pause()
    try:
        during = create(a.stub, prompt_token_ids=ids("efgh"))  # not registered: the store does not answer
        for position in range(4, 9):
            step(a.stub, before, "x", position)  # crosses 8 unstored, answered all the same
    finally:
        redis_server.resume()
    store = redis.Redis.from_url(redis_server.url)
    decode = a.running.engine.operations.decode

    def stored_position(session_id: str) -> int | None:
        state = store.hget(SESSION_PREFIX + session_id, "state")
        return None if state is None else decode(state)[1].position

    wait_until(lambda: (stored_position(before), stored_position(during)) == (9, 4))  # at once, not at the next mark
    assert registry.get_sample_value("rnnserve_session_store_writes_total") == writes + 2  # those two only


def test_another_callers_lost_session_is_unknown_to_them(replicas, redis_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token-0123456789 alice\nbob-token-0123456789ab bob\n")
    a = replicas(hibernate_after_seconds=0.2, auth_tokens_file=tokens)
    alice, bob = [(("authorization", f"Bearer {name}-token-0123456789{tail}"),) for name, tail in
                  (("alice", ""), ("bob", "ab"))]
    session_id = a.stub.CreateSession(pb.CreateSessionRequest(prompt_token_ids=ids("abc")), metadata=alice).session.session_id
    wait_until(lambda: a.held == 0)
    redis_server.stop()
    redis_server.start()
    store = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: store.hexists(SESSION_PREFIX + session_id, "lost"))
    request = pb.GetSessionRequest(session_id=session_id)
    assert_fails(lambda: a.stub.GetSession(request, metadata=bob), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert_fails(lambda: a.stub.GetSession(request, metadata=alice), grpc.StatusCode.NOT_FOUND, "SESSION_LOST")
