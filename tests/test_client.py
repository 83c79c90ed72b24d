"""The sync and asyncio clients against the real server on an ephemeral loopback port."""

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest

from rnnserve.client import (AsyncClient, Client, DeadlineExceeded, InvalidArgument, ModelNotFound, PositionMismatch,
                             Prediction, SessionNotFound)

PROMPT = "the king and the queen"


@pytest.fixture
def address(shared_server):
    return shared_server.address


@pytest.fixture
def client(address):
    with Client(address, timeout=10) as client:
        yield client


def candidates(prediction: Prediction) -> list[tuple[int, str]]:
    return [(c.id, c.text) for c in prediction.candidates]


def test_session_closes_on_leaving_with(client):
    with client.session() as session:
        assert session.info().position == 0
    with pytest.raises(SessionNotFound) as caught:
        client.resume(session.id)
    assert caught.value.reason == "SESSION_NOT_FOUND"
    session.close()  # closing again is harmless: the session is already gone


def test_step_by_text_and_by_ids_agree(client, bundle):
    with client.session() as by_text, client.session() as by_ids:
        from_text = by_text.step(PROMPT, top_k=4)
        from_ids = by_ids.step(bundle.vocab.encode(PROMPT), top_k=4)  # a numpy array
    assert from_text.position == from_ids.position == len(PROMPT)
    assert candidates(from_text) == candidates(from_ids)
    assert len(from_text.candidates) == 4
    assert sum(c.probability for c in from_text.candidates) <= 1.0 + 1e-6


def test_prompt_prediction_equals_a_step(client):
    with client.session(PROMPT) as prompted, client.session() as stepped:
        assert prompted.position == len(PROMPT)
        assert candidates(prompted.prediction) == candidates(stepped.step(PROMPT))


def test_retried_step_is_answered_from_the_record_not_applied_twice(client):
    with client.session() as session:
        first = session.step("the")
        session.position = 0  # as if the answer had been lost and the step were sent again
        again = session.step("the")
        assert again == first
        assert session.info().position == 3


def test_stale_position_is_refused_with_the_actual_one(client):
    with client.session("the") as session:
        session.step(" king")
        session.position = 1
        with pytest.raises(PositionMismatch) as caught:
            session.step("x")
        assert caught.value.actual_position == 8
        assert session.info().position == 8


def test_generate_streams_tokens_and_a_seed_reproduces_them(client):
    def sample(seed):
        with client.session(PROMPT) as session:
            tokens = list(session.generate(12, temperature=1.0, seed=seed))
            assert session.position == len(PROMPT) + 12 == session.info().position
        return tokens

    tokens = sample(seed=7)
    assert [t.position for t in tokens] == list(range(len(PROMPT) + 1, len(PROMPT) + 13))
    assert [t.finish_reason for t in tokens] == [None] * 11 + ["length"]
    assert sample(seed=7) == tokens


def test_greedy_generation_follows_the_top_prediction(client):
    with client.session(PROMPT) as generated, client.session(PROMPT) as stepped:
        texts = [token.text for token in generated.generate(6)]
        expected = [stepped.prediction.best.text]
        for _ in range(5):
            expected.append(stepped.step(expected[-1]).best.text)
    assert texts == expected


def test_generation_ends_at_a_stop_string(client):
    with client.session(PROMPT) as session:
        greedy = "".join(token.text for token in session.generate(10))
    stop = greedy[3]
    with client.session(PROMPT) as session:
        tokens = list(session.generate(10, stop=[stop]))
    assert "".join(token.text for token in tokens) == greedy[:greedy.index(stop) + 1]
    assert tokens[-1].finish_reason == "stop"


def test_stopping_a_generation_early_leaves_the_session_usable(client):
    with client.session(PROMPT) as session:
        for token in session.generate(1000, temperature=1.0, seed=1):
            if token.position == len(PROMPT) + 2:
                break
        assert session.position is None  # the server may have sent more than was read
        after = session.step("x")
        assert after.position == session.info().position >= len(PROMPT) + 3


def test_stream_carries_two_sessions_interleaved(client):
    words = ["the", " king", " and", " queen"]
    with client.session() as alone:
        expected = [alone.step(word) for word in words]
    with client.session() as first, client.session() as second, client.stream() as stream:
        for word, want in zip(words, expected):
            assert stream.step(first, word) == want
            assert stream.step(second, word) == want
        assert first.position == second.position == len("".join(words))


def test_stream_raises_a_failed_step_and_goes_on(client):
    with client.session() as session, client.stream() as stream:
        with pytest.raises(SessionNotFound):
            stream.step("no-such-session", "a")
        with pytest.raises(InvalidArgument):
            stream.step(session, "a", top_k=10**6)
        assert stream.step(session.id, "ab").position == 2


def test_step_batch_answers_each_step_at_its_index(client):
    with client.session() as first, client.session("the") as second:
        results = client.step_batch([(first, "a"), ("no-such-session", "b"), (second, " king")])
    assert [type(r) for r in results] == [Prediction, SessionNotFound, Prediction]
    assert (results[0].position, results[2].position) == (1, 8)
    assert (first.position, second.position) == (1, 8)


def test_invalid_argument_names_the_field(client):
    with client.session() as session:
        with pytest.raises(InvalidArgument) as caught:
            session.step("a", top_k=10**6)
        assert caught.value.reason == "INVALID_ARGUMENT"
        assert [v.field for v in caught.value.field_violations] == ["top_k"]
        with pytest.raises(InvalidArgument) as caught:
            session.step("")
        assert session.info().position == 0


def test_deadline_is_honoured(client):
    with client.session() as session, pytest.raises(DeadlineExceeded):
        session.step("the king" * 100, timeout=1e-6)


def test_models_and_health(client, bundle):
    models = client.models()
    assert [m.name for m in models] == [bundle.name]
    assert models[0].is_default and models[0].vocab_size == len(bundle.vocab)
    assert client.model(bundle.name) == models[0]
    with pytest.raises(ModelNotFound):
        client.model("no-such-model")
    assert client.health() == "SERVING"


def test_async_client_does_what_the_sync_client_does(address, client):
    with client.session(PROMPT) as reference:
        expected_step = reference.step(" and")
        expected_tokens = list(reference.generate(5, temperature=1.0, seed=3))

    async def run():
        async with AsyncClient(address) as aclient:
            async with aclient.session(PROMPT) as session:
                step = await session.step(" and")
                tokens = [token async for token in session.generate(5, temperature=1.0, seed=3)]
            async with aclient.stream() as stream:
                other = await aclient.session()
                streamed = await stream.step(other, PROMPT)
                with pytest.raises(SessionNotFound):
                    await stream.step("no-such-session", "a")
                await other.close()
            batch = await aclient.step_batch([("no-such-session", "a")])
            return step, tokens, streamed, batch, await aclient.health()

    step, tokens, streamed, batch, health = asyncio.run(run())
    assert step == expected_step and tokens == expected_tokens
    assert candidates(streamed) == candidates(reference.prediction)
    assert isinstance(batch[0], SessionNotFound) and health == "SERVING"


def test_many_threads_share_one_client(client):
    """One channel serves concurrent callers; each session still sees its own steps in order."""
    def converse(word):
        with client.session() as session:
            return [session.step(ch).position for ch in itertools.islice(itertools.cycle(word), 20)]

    with ThreadPoolExecutor(8) as pool:
        assert all(positions == list(range(1, 21)) for positions in pool.map(converse, ["ab", "cd"] * 8))
