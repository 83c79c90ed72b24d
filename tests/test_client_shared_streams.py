"""`session.step()` over the Stream calls a client shares among its sessions, against real servers.

What a unary step promises must hold over a shared stream: each session's steps in order among
other sessions' steps, a retried step applied once, deadlines, cancellation, a stream that breaks
mid-flight and a server that restarts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from serving import RunningServer, Unbatched, free_port
from redis_process import RedisProcess
from tcp_relay import TcpRelay

from rnnserve.client import AsyncClient, Client, DeadlineExceeded, PositionMismatch, Prediction
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc

WORDS = ["the quick brown fox", "jumps over the lazy", "dog; 0123456789!?", "The lazy dog, quick"]


def rpcs(running, method: str) -> float:
    """How many `method` calls the server has answered OK."""
    found = running.engine.metrics.registry.get_sample_value("rnnserve_rpcs_total", {"method": method, "code": "OK"})
    return found or 0.0


def ids(prediction: Prediction) -> list[int]:
    return [candidate.id for candidate in prediction.candidates]


def expected(bundle, text: str) -> list[list[int]]:
    """The top 5 ids after each character of `text`, fed one at a time to the unbatched reference."""
    reference, answers = Unbatched(bundle), []
    for character in text:
        reference.feed(bundle.vocab.encode(character))
        answers.append(reference.top_k(5)[0])
    return answers


def server_position(address: str, session_id: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        return stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=5).position


def test_interleaved_sessions_each_step_in_order_over_one_stream(start_server, bundle):
    running = start_server()

    async def converse(client: AsyncClient, text: str) -> list[tuple[int, list[int]]]:
        async with client.session() as session:
            answers = []
            for character in text:
                prediction = await session.step(character)
                answers.append((prediction.position, ids(prediction)))
            return answers

    async def run():
        async with AsyncClient(running.address, timeout=10) as client:
            return await asyncio.gather(*(converse(client, text) for text in WORDS * 2))

    for text, answers in zip(WORDS * 2, asyncio.run(run())):
        assert [position for position, _ in answers] == list(range(1, len(text) + 1))
        assert [top for _, top in answers] == expected(bundle, text)
    assert rpcs(running, "Step") == 0 and rpcs(running, "Stream") <= 1  # one stream, still open or ended


def test_sync_threads_share_the_stream_in_order(start_server, bundle):
    running = start_server()

    def converse(text: str) -> list[list[int]]:
        with client.session() as session:
            return [ids(session.step(character)) for character in text]

    with Client(running.address, timeout=10) as client, ThreadPoolExecutor(4) as pool:
        for text, answers in zip(WORDS, pool.map(converse, WORDS)):
            assert answers == expected(bundle, text)
    assert rpcs(running, "Step") == 0


def test_unary_option_keeps_plain_step_calls(start_server):
    running = start_server()
    with Client(running.address, unary=True) as client, client.session() as session:
        for character in "fox":
            session.step(character)
    assert rpcs(running, "Step") == 3 and rpcs(running, "Stream") == 0


def test_a_step_past_its_deadline_raises_and_its_retry_applies_it_once(start_server):
    running = start_server()
    prompt = "the quick brown fox " * 40
    with Client(running.address, timeout=10) as client, client.session() as session:
        with pytest.raises(DeadlineExceeded):
            session.step(prompt, timeout=1e-6)
        assert session.position == 0  # the late answer, if any, was dropped: the retry below is recognised
        assert session.step(prompt).position == len(prompt)
        assert session.info().position == len(prompt)
        assert session.step("!").position == len(prompt) + 1


def test_a_cancelled_step_leaves_the_stream_and_other_sessions_going(start_server):
    running = start_server()
    prompt = "jumps over the lazy dog " * 40

    async def run() -> tuple[int, int, int]:
        async with AsyncClient(running.address, timeout=10) as client:
            cancelled, other = await client.session(), await client.session()
            await other.step("a")  # the stream is open
            step = asyncio.create_task(cancelled.step(prompt))
            await asyncio.sleep(0)  # sent
            step.cancel()
            with pytest.raises(asyncio.CancelledError):
                await step
            others = [(await other.step(character)).position for character in "bcd"]
            assert others == [2, 3, 4]
            # The cancelled step may have applied: resending it with the position it expected is answered once.
            return (await cancelled.step(prompt)).position, (await cancelled.info()).position, cancelled.position

    assert asyncio.run(run()) == (len(prompt), len(prompt), len(prompt))


def test_a_stream_broken_after_the_server_applied_a_step_resends_it_and_it_applies_once(start_server, bundle):
    running = start_server()
    relay = TcpRelay(running.address)
    try:
        with Client(relay.address, timeout=10) as client, client.session() as session, ThreadPoolExecutor(1) as pool:
            session.step("the")
            relay.hold()  # the server's answers are lost from here
            stepping = pool.submit(session.step, " fox")
            deadline = time.monotonic() + 10
            while server_position(running.address, session.id) != len("the fox"):  # applied, its answer held
                assert time.monotonic() < deadline and not stepping.done()
                time.sleep(0.01)
            relay.cut()  # the stream fails with the step in flight: UNAVAILABLE, resent on a new stream
            prediction = stepping.result(10)
            assert prediction.position == len("the fox") == server_position(running.address, session.id)
            assert ids(prediction) == expected(bundle, "the fox")[-1]
            assert session.step("!").position == len("the fox!")
    finally:
        relay.close()


def test_a_step_without_a_known_position_is_not_resent_when_its_stream_breaks(start_server):
    """A unary step without expected_position is not retried on UNAVAILABLE; neither is it over a stream."""
    running = start_server()
    relay = TcpRelay(running.address)
    try:
        with Client(relay.address, timeout=10) as client, client.session() as session, ThreadPoolExecutor(1) as pool:
            session.step("the")
            session.position = None  # as after an abandoned generation: the client no longer knows it
            relay.hold()
            stepping = pool.submit(session.step, " fox")
            deadline = time.monotonic() + 10
            while server_position(running.address, session.id) != len("the fox"):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            relay.cut()
            with pytest.raises(Exception) as failed:
                stepping.result(10)
            assert getattr(failed.value, "code", None) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                                           grpc.StatusCode.UNKNOWN)
            assert server_position(running.address, session.id) == len("the fox")  # applied once, not twice
    finally:
        relay.close()


def test_steps_go_on_through_a_server_restart(bundle, start_server, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    snapshot = str(tmp_path / "sessions.snap")
    first = RunningServer(bundle, Settings(listen=address, snapshot_path=snapshot))
    with Client(address, timeout=10, retries=12) as client:
        session = client.session("the quick")
        assert session.step(" brown").position == len("the quick brown")
        first.stop()  # the shared stream fails; the session is in the snapshot
        restarting = threading.Timer(0.5, lambda: start_server(listen=address, snapshot_path=snapshot))
        restarting.start()
        try:
            # Sent while no server listens: refused UNAVAILABLE, resent with backoff until the new one answers.
            assert session.step(" fox").position == len("the quick brown fox")
        finally:
            restarting.join()
        assert session.info().position == len("the quick brown fox")


def test_a_stale_position_over_a_stream_is_refused_as_over_a_unary_call(shared_server):
    with Client(shared_server.address) as client, client.session() as session:
        session.step("ab")
        session.position = 1
        with pytest.raises(PositionMismatch) as refused:
            session.step("c")
        assert refused.value.actual_position == 2
        session.position = refused.value.actual_position
        assert [session.step(character).position for character in "xyz"] == [3, 4, 5]


def test_a_server_routed_by_session_gets_a_stream_per_session_naming_it(start_server, tmp_path):
    """Replicas sharing sessions through Redis sit behind a proxy hashing x-session-id: after the first answer
    tells the client so, each session's steps go on a stream of its own that names it."""
    with RedisProcess(tmp_path) as redis_process:
        running = start_server(redis_url=redis_process.url)
        with Client(running.address, timeout=10) as client:
            sessions = [client.session() for _ in range(3)]
            for character in "abc":
                for session in sessions:
                    assert session.step(character).position == "abc".index(character) + 1
            for session in sessions:
                session.close()  # ends its stream
            deadline = time.monotonic() + 10
            while rpcs(running, "Stream") < 1 + len(sessions):  # the shared one, retired, and one per session
                assert time.monotonic() < deadline, rpcs(running, "Stream")
                time.sleep(0.05)
        assert rpcs(running, "Stream") == 1 + len(sessions) and rpcs(running, "Step") == 0
