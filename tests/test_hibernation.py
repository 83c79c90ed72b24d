"""Sessions between replicas through a real redis-server: hibernation, wake-up, hand-off, fencing, faults."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.bundle import Bundle
from rnnserve.server.app import STORE_HEALTH_NAME
from rnnserve.server.settings import Settings
from rnnserve.server.store.session_store import REPLICA_PREFIX, SESSION_PREFIX
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

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.channel.close()
            self.running.stop()


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
