"""The batcher without a server: batched equals unbatched, order holds, and nothing half-applies."""

import asyncio
import threading
import time

import numpy as np
import pytest

from rnnserve.server.core.batcher import Batcher, BatchReport, row_limit
from rnnserve.server.core.errors import PositionMismatch, ServerFault, SessionNotFound
from rnnserve.server.core.sessions import Removal, SessionTable
from rnnserve.server.model.runtime import Runtime
from rnnserve.server.model.state_pool import StatePool
from serving import assert_prediction, table_model


class Core:
    """Runtime, pool, table and batcher, wired as the engine wires them."""

    def __init__(self, bundle, **limits):
        self.runtime = Runtime(bundle, threads=1, spinning=False)
        self.pool = StatePool(Batcher.pool_rows(self.runtime), limit=64)
        self.table = SessionTable(max_sessions=64, evict_when_full=False, remember_removed=64)
        self.reports: list[BatchReport] = []
        options = {"max_batch_size": 256, "max_batch_tokens": 65_536, "max_queue_delay_seconds": 0.0, **limits}
        self.batcher = Batcher(self.runtime, self.pool, on_batch=self.reports.append, **options)
        self.model = table_model(self.pool, bundle, self.batcher)

    def session(self):
        return self.table.create("", 60, self.model)

    def step(self, session, tokens, **options):
        options = {"top_k": 5, "temperature": 1.0, **options}
        return self.batcher.submit(session, np.array(tokens, np.int64), **options)


def with_core(bundle, scenario, **limits):
    """Run `await scenario(core)` with the batcher's loop running; return what it returns."""
    async def main():
        core = Core(bundle, **limits)
        task = asyncio.create_task(core.batcher.run())
        try:
            return await scenario(core)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return asyncio.run(main())


def test_batched_equals_unbatched_for_random_interleavings(any_bundle, unbatched, monkeypatch):
    bundle = any_bundle
    rng = np.random.default_rng(len(bundle.cell))
    vocab = len(bundle.vocab)
    # Per session: chunks of tokens (mostly single steps, some prefills of several lengths) and a temperature each.
    plans = [[(rng.integers(0, vocab, rng.choice([1, 1, 1, 2, 5, 9])), float(rng.choice([1.0, 0.5, 2.0])))
              for _ in range(rng.integers(3, 12))] for _ in range(16)]
    calls = []

    async def scenario(core):
        gather = core.pool.gather
        monkeypatch.setattr(core.pool, "gather", lambda names, slots: calls.append(slots.tolist()) or
                            gather(names, slots))
        sessions = [core.session() for _ in plans]
        order = [index for index, plan in enumerate(plans) for _ in plan]
        rng.shuffle(order)
        cursor = [0] * len(plans)
        futures = [[] for _ in plans]
        for index in order:  # each session's chunks in order, sessions interleaved at random
            tokens, temperature = plans[index][cursor[index]]
            cursor[index] += 1
            futures[index].append(core.step(sessions[index], tokens, temperature=temperature))
            if rng.random() < 0.3:
                await asyncio.sleep(0)  # let batches run between some submissions
        return [await asyncio.gather(*session_futures) for session_futures in futures], core.reports

    answers, reports = with_core(bundle, scenario, max_batch_size=6)
    for plan, session_answers in zip(plans, answers):
        reference = unbatched(bundle)
        position = 0
        for (tokens, temperature), answer in zip(plan, session_answers, strict=True):
            reference.feed(tokens)
            position += len(tokens)
            assert answer.position == position  # applied once each, in order
            assert_prediction(answer.prediction, reference, temperature=temperature)
    assert all(len(set(slots)) == len(slots) for slots in calls)  # a session at most once per call
    assert max(report.steps for report in reports) > 1  # and steps did share calls
    assert sum(report.applied for report in reports) == sum(map(len, plans))


def test_a_failed_model_call_applies_nothing(bundle, unbatched, monkeypatch):
    async def scenario(core):
        session = core.session()
        await core.step(session, [1, 2, 3])
        rows_before = core.pool.row_to_bytes(session.slot)
        run = core.runtime.run

        def fail_once(*args):
            monkeypatch.setattr(core.runtime, "run", run)
            raise RuntimeError("simulated onnxruntime failure")

        monkeypatch.setattr(core.runtime, "run", fail_once)
        with pytest.raises(ServerFault):
            await core.step(session, [4])
        assert session.position == 3 and core.pool.row_to_bytes(session.slot) == rows_before
        assert core.reports[-1].failed
        return await core.step(session, [4])

    answer = with_core(bundle, scenario)
    reference = unbatched(bundle)
    reference.feed([1, 2, 3])
    reference.feed([4])
    assert answer.position == 4
    assert_prediction(answer.prediction, reference)


def test_withdrawn_and_late_steps_are_not_applied(bundle, unbatched):
    async def scenario(core):
        session = core.session()
        withdrawn = core.step(session, [1])
        withdrawn.cancel()
        late = core.step(session, [2], deadline=time.monotonic() - 1)
        kept = await core.step(session, [3])
        return late.cancelled(), kept

    late_cancelled, kept = with_core(bundle, scenario)
    reference = unbatched(bundle)
    reference.feed([3])
    assert late_cancelled and kept.position == 1
    assert_prediction(kept.prediction, reference)


def test_expected_position_replays_an_exact_retry_and_refuses_a_stale_one(bundle):
    async def scenario(core):
        session = core.session()
        first = await core.step(session, [1, 2], expected_position=0)
        calls = len(core.reports)
        retried = await core.step(session, [1, 2], expected_position=0)
        with pytest.raises(PositionMismatch) as caught:
            await core.step(session, [5], expected_position=1)
        assert len(core.reports) == calls  # answered without the model
        return first, retried, caught.value.actual, session.position

    first, retried, actual, position = with_core(bundle, scenario)
    assert retried is first and actual == 2 and position == 2


def test_work_queued_behind_a_hold_waits_for_its_release(bundle):
    async def scenario(core):
        generating, closing = core.session(), core.session()
        holds = [await core.batcher.hold(session) for session in (generating, closing)]
        queued = [core.step(session, [1]) for session in (generating, closing)]
        held = await holds[0].submit(np.array([2, 3]))
        assert not any(future.done() for future in queued)
        core.table.remove(closing, Removal.CLOSED)  # as a close does, under its hold
        for hold in holds:
            hold.release()
        with pytest.raises(SessionNotFound, match="closed"):
            await queued[1]
        return held, await queued[0]

    held, queued = with_core(bundle, scenario)
    assert (held.position, queued.position) == (2, 3)


def test_prefills_run_by_length_within_the_token_budget(bundle):
    async def scenario(core):
        futures = [core.step(core.session(), [1] * length) for length in (4, 4, 4, 2, 2, 1, 1)]
        await asyncio.gather(*futures)
        return core.reports

    reports = with_core(bundle, scenario, max_batch_tokens=8)
    lengths = sorted((report.tokens // report.steps, report.steps) for report in reports)
    assert lengths == [(1, 2), (2, 2), (4, 1), (4, 2)]
    assert all(report.tokens <= 8 for report in reports)


@pytest.mark.parametrize(("length", "rows"), [(1, 256), (256, 256), (1000, 65), (100_000, 1)])
def test_row_limit_bounds_the_tokens_of_a_call(length, rows):
    assert row_limit(256, 65_536, length) == rows


def test_lone_steps_on_the_loop_equal_the_model_thread_and_keep_order_when_the_path_switches(bundle, unbatched):
    """With loop_max_tokens 1, a lone step runs on the loop's thread; a step that finds others waiting (or a
    prefill) goes to the model thread. Answers equal the reference either way, in each session's order."""
    threads = []

    async def scenario(core):
        compute = core.batcher._compute

        def recording(*args):
            threads.append(threading.current_thread().name)
            return compute(*args)

        core.batcher._compute = recording
        sessions = [core.session() for _ in range(4)]
        references = [unbatched(bundle) for _ in sessions]
        rng = np.random.default_rng(7)
        for round_ in range(8):
            # even rounds: one session alone; odd rounds: all four, each sending three steps without waiting
            active = [0] if round_ % 2 == 0 else range(len(sessions))
            plans = {i: [[int(t)] for t in rng.integers(len(bundle.vocab), size=1 if round_ % 2 == 0 else 3)]
                     for i in active}
            futures = {i: [core.step(sessions[i], tokens) for tokens in plan] for i, plan in plans.items()}
            for i, plan in plans.items():
                for tokens, answer in zip(plan, await asyncio.gather(*futures[i])):
                    references[i].feed(tokens)
                    assert_prediction(answer.prediction, references[i])
        assert [session.position for session in sessions] == [4 + 4 * 3] + [4 * 3] * 3
        references[0].feed([1, 2, 3])
        assert_prediction((await core.step(sessions[0], [1, 2, 3])).prediction, references[0])

    with_core(bundle, scenario, loop_max_tokens=1)
    on_loop = [name for name in threads if not name.startswith("rnnserve-model")]
    assert on_loop and len(on_loop) < len(threads)  # both paths were taken
    assert threads[-1].startswith("rnnserve-model")  # a prefill of 3 tokens never runs on the loop


def test_adaptive_batching_waits_for_the_sessions_on_their_way_back_but_never_for_a_lone_one(bundle):
    """With an adaptive wait and gap far longer than the test, a call runs only once every session answered
    moments ago is back (or none was): the wait is never what lets a step through."""

    async def scenario(core):
        lone = core.session()
        for token in (1, 2, 3):  # a lone session: nobody else is on the way back, so it never waits
            await asyncio.wait_for(core.step(lone, [token]), 5)
        sessions = [core.session() for _ in range(4)]
        await asyncio.gather(*(core.step(session, [1]) for session in sessions))  # one call of 4
        first_half = [core.step(session, [2]) for session in sessions[:2]]
        await asyncio.sleep(0.05)
        assert not any(future.done() for future in first_half)  # waiting for the other two
        rest = [core.step(session, [2]) for session in sessions[2:]]
        await asyncio.wait_for(asyncio.gather(*first_half, *rest), 5)
        return [report.steps for report in core.reports]

    assert with_core(bundle, scenario, adaptive_wait_seconds=60.0, adaptive_gap_seconds=60.0) == [1, 1, 1, 4, 4]


def test_adaptive_batching_stops_waiting_once_steps_stop_arriving(bundle):
    """Sessions that do not come back cost the steps queued meanwhile one gap of waiting, not the whole wait."""

    async def scenario(core):
        sessions = [core.session() for _ in range(4)]
        await asyncio.gather(*(core.step(session, [1]) for session in sessions))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(core.step(sessions[0], [2]), 5)  # three others are on their way back, never coming
        return loop.time() - started, [report.steps for report in core.reports]

    waited, calls = with_core(bundle, scenario, adaptive_wait_seconds=60.0, adaptive_gap_seconds=0.05)
    assert calls == [4, 1]
    assert waited >= 0.05  # it did wait for the others, one gap (and far less than the 60 s wait)
