"""Fork, reset, rewind, score, peek, export/import and named states through the sync and asyncio clients.

Against a real server: each test checks what the operation does to predictions and positions,
not only that a call went through. Predictions computed in the same shape (a fork's step, an
imported session's stored answer) are compared exactly; those reached another way (a rewind's
replay, a prompt read from a named state) within float tolerance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time

import numpy as np
import pytest

from rnnserve.bundle import load_bundle
from rnnserve.client import (AsyncClient, Client, ContinuationScore, IncompatibleState, InvalidArgument, NamedState,
                             PositionMismatch, Prediction, RewindBeyondDepth, Session, SessionNotFound,
                             StateIsShipped, StateNotFound, Unavailable)
from rnnserve.initial_states import add_initial_state
from rnnserve.v1 import rnnserve_pb2 as pb
from serving import free_port

PROMPT = "the lazy dog jumps"
DEPTH = 32  # the server's default --rewind-depth


@pytest.fixture
def client(shared_server):
    with Client(shared_server.address, timeout=10) as client:
        yield client


@pytest.fixture
def vocab_size(client) -> int:
    return client.models()[0].vocab_size


def assert_close(a: Prediction | None, b: Prediction | None) -> None:
    """The same candidates at the same position, probabilities within float tolerance."""
    assert a is not None and b is not None
    assert a.position == b.position
    assert [c.id for c in a.candidates] == [c.id for c in b.candidates]
    np.testing.assert_allclose([c.probability for c in a.candidates], [c.probability for c in b.candidates],
                               atol=1e-5)


# Fork --------------------------------------------------------------------------------------------------------------

def test_forks_start_where_the_source_is_predict_alike_and_close_on_leaving_with(client):
    with client.session(PROMPT) as source:
        with source.fork() as twin:
            assert isinstance(twin, Session) and twin.position == source.position == len(PROMPT)
            assert twin.id != source.id
            assert twin.step(" o") == source.step(" o")
        with pytest.raises(SessionNotFound):
            client.resume(twin.id)
        forks = source.fork(2, ttl=30)
        assert [fork.position for fork in forks] == [len(PROMPT) + 2] * 2
        answers = [fork.step("x") for fork in forks]
        assert answers[0] == answers[1] and source.position == len(PROMPT) + 2  # the source did not move
        assert all(fork.info().expires < source.info().expires for fork in forks)  # 30 s, not the default hour
        for fork in forks:
            fork.close()


def test_a_fork_from_a_stale_position_makes_nothing(client):
    with client.session(PROMPT) as source:
        source.position = 3
        with pytest.raises(PositionMismatch) as caught:
            source.fork()
        assert caught.value.actual_position == len(PROMPT)
        with pytest.raises(ValueError, match="count"):
            source.fork(0)  # the wire reads 0 as 1: refused before it could make a session


# Reset and rewind --------------------------------------------------------------------------------------------------

def test_reset_returns_to_zeros_keeping_the_id(client):
    with client.session(PROMPT) as session, client.session() as fresh:
        info = session.reset()
        assert (info.id, info.position, info.rewindable, session.position) == (session.id, 0, 0, 0)
        assert session.step("the") == fresh.step("the")
        session.position = 0  # as if the answer to that step had been lost: resending the reset is refused
        with pytest.raises(PositionMismatch) as caught:
            session.reset()
        assert caught.value.actual_position == 3 == session.info().position


def test_rewind_then_step_equals_a_session_that_never_read_the_undone_tokens(client):
    with client.session(PROMPT) as session:
        session.step(" over")
        rewound = session.rewind(7)
        assert session.position == len(PROMPT) - 2 == rewound.position == session.info().position
        session.position = len(PROMPT) + 5  # as if the answer had been lost and the rewind were resent
        with pytest.raises(PositionMismatch) as caught:
            session.rewind(7)
        assert caught.value.actual_position == len(PROMPT) - 2 == session.info().position  # undone once only
        session.position = caught.value.actual_position
        with client.session(PROMPT[:-2]) as never:
            assert_close(rewound, never.prediction)
            assert_close(session.step(" fox"), never.step(" fox"))
        assert session.rewind(session.position) is None  # back at position 0 of zeros: nothing predicts
        assert session.position == 0


def test_rewinding_past_the_depth_raises_with_what_can_be_undone(client):
    with client.session(PROMPT * 3) as session:
        with pytest.raises(RewindBeyondDepth) as caught:
            session.rewind(DEPTH + 1)
        assert caught.value.reason == "REWIND_BEYOND_DEPTH"
        assert caught.value.rewindable == DEPTH == session.info().rewindable
        assert session.position == len(PROMPT) * 3 == session.info().position  # the refusal changed nothing


# Score and peek ----------------------------------------------------------------------------------------------------

def test_score_equals_the_logprobs_of_stepping_each_token_and_advances_nothing(client, vocab_size):
    candidates = [" over", "x", [3, 1, 4]]
    with client.session(PROMPT) as session:
        scores = session.score(*candidates)
        assert session.position == len(PROMPT) == session.info().position
    assert [type(score) for score in scores] == [ContinuationScore] * 3
    assert scores[0].text == " over" and scores[2].token_ids == [3, 1, 4]
    for score in scores:
        with client.session(PROMPT, top_k=vocab_size) as stepped:
            prediction = stepped.prediction
            for token, logprob, rank in zip(score.token_ids, score.logprobs, score.ranks, strict=True):
                ranked = [c.id for c in prediction.candidates]
                assert logprob == pytest.approx(prediction.candidates[ranked.index(token)].logprob, abs=1e-5)
                assert rank == ranked.index(token) + 1
                prediction = stepped.step([token], top_k=vocab_size)
        assert score.total_logprob == pytest.approx(sum(score.logprobs), abs=1e-4)


def test_score_from_nothing_read_names_the_field(client):
    with client.session() as session, pytest.raises(InvalidArgument) as caught:
        session.score("a")
    assert [v.field for v in caught.value.field_violations] == ["continuations"]


def test_peek_answers_as_a_step_would_without_advancing(client):
    with client.session(PROMPT) as session:
        peeked = session.peek(" ov", top_k=3)
        assert peeked.position == len(PROMPT) + 3 and session.position == len(PROMPT) == session.info().position
        assert session.step(" ov", top_k=3) == peeked


# Export and import -------------------------------------------------------------------------------------------------

def test_an_imported_session_continues_exactly_where_the_exported_one_was(client):
    with client.session(PROMPT) as original:
        blob = original.export()
        assert isinstance(blob, bytes) and original.position == len(PROMPT)
        with client.import_session(blob) as copy:
            assert copy.id != original.id and copy.position == len(PROMPT)
            assert copy.prediction == original.prediction
            assert copy.step(" ov") == original.step(" ov")
            assert list(copy.generate(8, temperature=1.0, seed=5)) == list(original.generate(8, temperature=1.0,
                                                                                                 seed=5))
            assert_close(copy.rewind(4), original.rewind(4))  # the kept tokens travel too


def test_import_refuses_another_models_blob_and_a_damaged_one(client, start_server, bundles):
    with client.session(PROMPT) as session:
        blob = session.export()
    with Client(start_server(bundles["gru"]).address, timeout=10) as other:
        with pytest.raises(IncompatibleState) as caught:
            other.import_session(blob)
        assert caught.value.reason == "INCOMPATIBLE_STATE"
    damaged = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(InvalidArgument):
        client.import_session(damaged)


# Named states and the prefix-state cache ---------------------------------------------------------------------------

def test_a_named_state_starts_sessions_and_is_a_cached_prefix(client):
    named = client.register_state("client-dog", "the lazy dog")
    assert named == NamedState("client-dog", "registered", 12, "the lazy dog")
    assert named in client.states()
    with client.session(" naps", initial_state="client-dog") as started, client.session("the lazy dog naps") as read:
        assert started.position == 5 and started.info().initial_state == "client-dog"
        assert read.cached_prompt_tokens == 12  # the registered prompt is pinned in the cache
        assert_close(started.prediction, dataclasses.replace(read.prediction, position=5))
        started.reset()
        assert started.info().initial_state == "client-dog"
        assert started.step(" naps") == started.prediction  # reset returns to the named state, not to zeros
    client.delete_state("client-dog")
    assert "client-dog" not in [state.name for state in client.states()]
    with pytest.raises(StateNotFound) as caught:
        client.session(initial_state="client-dog")
    assert caught.value.reason == "STATE_NOT_FOUND"
    with pytest.raises(StateNotFound):
        client.delete_state("client-dog")


def test_a_repeated_prompt_is_taken_from_the_cache(client):
    prompt = "0123456789 quick brown foxes"
    with client.session(prompt) as first, client.session(prompt) as again:
        assert (first.cached_prompt_tokens, again.cached_prompt_tokens) == (0, len(prompt))
        assert again.prediction == first.prediction


def test_a_shipped_state_starts_sessions_and_cannot_be_deleted_or_replaced(bundle, tmp_path, start_server):
    shutil.copytree(bundle.path, tmp_path / "bundle")
    add_initial_state(tmp_path / "bundle", "fox", "the quick fox")
    with Client(start_server(load_bundle(tmp_path / "bundle")).address, timeout=10) as client:
        assert client.states() == [NamedState("fox", "bundle", 13, "the quick fox")]
        with client.session(initial_state="fox") as started:
            assert started.position == 0 and started.info().initial_state == "fox"
        for refused in (lambda: client.delete_state("fox"), lambda: client.register_state("fox", "a")):
            with pytest.raises(StateIsShipped) as caught:
                refused()
            assert caught.value.reason == "STATE_IS_SHIPPED"
        assert client.states() == [NamedState("fox", "bundle", 13, "the quick fox")]


# Retries -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("build", "at_a_known_position", "at_an_unknown_one"), [
    (lambda s: s._fork(None, None), False, False),  # the source does not move: a resent fork would make a second set
    (lambda s: s._reset(), True, False),  # moving a session is repeated only where the server can tell it landed
    (lambda s: s._rewind(1, 5, None), True, False),
    (lambda s: s._score(["a"]), True, True),  # reading is always harmless to repeat
    (lambda s: s._peek("a", 5, None), True, True),
    (lambda s: s._export(), True, True),
    (lambda s: Session._import(s._client, b"", None, 5, None), False, False),  # a lost answer leaves a session
], ids=["fork", "reset", "rewind", "score", "peek", "export", "import"])
def test_which_operations_are_retried(build, at_a_known_position, at_an_unknown_one):
    with Client(f"127.0.0.1:{free_port()}") as client:
        session = Session(client, pb.Session(session_id="s", position=4))
        assert build(session).retry_safe is at_a_known_position
        session.position = None  # as after a generation that ended early
        assert build(session).retry_safe is at_an_unknown_one


def test_unsafe_operations_fail_at_once_on_a_missing_server():
    with Client(f"127.0.0.1:{free_port()}", retries=10) as client:
        session = Session(client, pb.Session(session_id="s", position=4))
        started = time.monotonic()
        for call in (session.fork, lambda: client.import_session(b"x"), lambda: client.register_state("n", "a")):
            with pytest.raises(Unavailable):
                call()
        assert time.monotonic() - started < 3.0  # ten retries with backoff would take seconds each


# The asyncio client ------------------------------------------------------------------------------------------------

def test_the_async_client_does_each_operation_as_the_sync_one(shared_server, client):
    with client.session(PROMPT) as reference:
        expected_peek = reference.peek(" ov")
        expected_scores = reference.score(" ov", "x")
        expected_rewind = reference.rewind(5)
        blob = reference.export()

    async def run():
        async with AsyncClient(shared_server.address, timeout=10) as aclient:
            async with aclient.session(PROMPT) as session:
                peeked, scores = await session.peek(" ov"), await session.score(" ov", "x")
                async with await session.fork() as twin:
                    twins = await twin.step("a"), await session.step("a")
                forks = await session.fork(2)
                await asyncio.gather(*(fork.close() for fork in forks))
                rewound = await session.rewind(6)
                position_after_rewind = session.position
                info = await session.reset()
                with pytest.raises(RewindBeyondDepth) as caught:
                    await session.rewind(1)
                assert caught.value.rewindable == 0  # nothing read since the reset
            imported = await aclient.import_session(blob)
            imported_step = await imported.step(" ov")
            await imported.close()
            registered = await aclient.register_state("async-dog", "the lazy dog")
            listed = await aclient.states()
            await aclient.delete_state("async-dog")
            with pytest.raises(StateNotFound):
                await aclient.delete_state("async-dog")
            return (peeked, scores, twins, len(forks), rewound, position_after_rewind, info, imported, imported_step,
                    registered, listed)

    (peeked, scores, twins, forks, rewound, position_after_rewind, info, imported, imported_step, registered,
     listed) = asyncio.run(run())
    assert peeked == expected_peek and scores == expected_scores
    assert twins[0] == twins[1] and forks == 2
    assert_close(rewound, expected_rewind)
    assert position_after_rewind == len(PROMPT) - 5
    assert info.position == 0
    assert imported.prediction == expected_rewind  # where the exported session was, len(PROMPT) - 5
    assert imported_step.position == imported.position == len(PROMPT) - 2
    assert registered in listed
