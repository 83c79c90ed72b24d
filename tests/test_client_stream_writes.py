"""The asyncio client's shared streams as they write: requests queued behind a write in progress, and deadlines
kept by a timer on the answer, against a real server.

test_client_shared_streams.py pins what a unary step promises; these cover how the asyncio client now keeps it:
each request is written by the caller that finds its stream idle or by the completion of the write before it,
and a deadline fails the answer's future rather than wrapping it in asyncio.wait_for.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from serving import slow_model
from test_client_shared_streams import WORDS, expected, ids, rpcs

from rnnserve.client import AsyncClient, DeadlineExceeded, shared_streams


def streams_ended(running, at_least: int) -> float:
    """Stream calls the server has seen end, whatever their code (a closing client cancels its streams): waited
    for until there are `at_least`, as the server hears of a cancellation after the client has gone, then read
    again a moment later so that one more would be counted too."""
    registry = running.engine.metrics.registry

    def count() -> float:
        return sum(sample.value for metric in registry.collect() if metric.name == "rnnserve_rpcs"
                   for sample in metric.samples
                   if sample.name == "rnnserve_rpcs_total" and sample.labels.get("method") == "Stream")

    deadline = time.monotonic() + 10
    while count() < at_least and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    return count()


def test_steps_queued_behind_a_write_in_progress_go_out_in_order(start_server, bundle, monkeypatch):
    """With one shared stream at most, every session's steps queue on it behind the write in progress; each
    session still reads its own answers, in order."""
    monkeypatch.setattr(shared_streams, "MOST_SHARED", 1)
    running = start_server()

    texts = [text[:min(map(len, WORDS))] for text in WORDS * 2]

    async def run() -> list[list[tuple[int, list[int]]]]:
        async with AsyncClient(running.address, timeout=10) as client:
            sessions = [await client.session() for _ in texts]
            answers: list[list[tuple[int, list[int]]]] = [[] for _ in texts]
            for wave in zip(*texts):  # every session's next step in flight at once, all on the one stream
                predictions = await asyncio.gather(*(session.step(c) for session, c in zip(sessions, wave)))
                for answered, prediction in zip(answers, predictions):
                    answered.append((prediction.position, ids(prediction)))
            return answers

    for text, answers in zip(texts, asyncio.run(run())):
        assert [position for position, _ in answers] == list(range(1, len(text) + 1))
        assert [top for _, top in answers] == expected(bundle, text)
    assert rpcs(running, "Step") == 0 and streams_ended(running, 1) == 1


def test_a_session_whose_last_step_was_answered_never_waits_behind_another_sessions_step(start_server):
    """The stream a session's answered step went on may carry another session's step by now: the session's next
    step takes a stream with nothing in flight (here a new one), rather than queueing behind that one."""
    running = start_server()
    slow_model(running, 0.3)  # every step stays in flight long enough for the next to be sent beside it

    async def run() -> tuple[int, int]:
        async with AsyncClient(running.address, timeout=10) as client:
            first, second = await client.session(), await client.session()
            await first.step("a")  # its stream is idle again
            stepping = asyncio.create_task(second.step("x"))
            await asyncio.sleep(0)  # sent, on the idle stream
            position = (await first.step("b")).position
            return position, (await stepping).position

    assert asyncio.run(run()) == (2, 1)
    assert streams_ended(running, 2) == 2


def test_an_awaited_step_past_its_deadline_raises_and_its_retry_applies_it_once(start_server):
    running = start_server()
    prompt = "the quick brown fox " * 40

    async def run() -> tuple[int, int, int]:
        async with AsyncClient(running.address, timeout=10) as client, client.session() as session:
            with pytest.raises(DeadlineExceeded):
                await session.step(prompt, timeout=1e-6)
            assert session.position == 0  # the late answer, if any, was dropped: the retry below is recognised
            retried = (await session.step(prompt)).position
            return retried, (await session.info()).position, (await session.step("!")).position

    assert asyncio.run(run()) == (len(prompt), len(prompt), len(prompt) + 1)


def test_a_step_answered_in_time_leaves_no_timer_behind(start_server):
    """Each step's deadline timer is cancelled with its answer: a client that steps often keeps none running."""
    running = start_server()

    async def run() -> int:
        async with AsyncClient(running.address, timeout=30) as client, client.session() as session:
            for character in "the fox":
                await session.step(character)
            loop = asyncio.get_running_loop()
            return sum(1 for timer in loop._scheduled if not timer.cancelled() and timer.when() > loop.time() + 20)

    assert asyncio.run(run()) == 0
