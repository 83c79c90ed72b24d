"""Fork, reset, rewind, score, peek and named states against a real server: each exactness claim, each refusal.

"Bit-exact" claims compare runs whose model calls have the same shape (a batch of one, the same
lengths), which onnxruntime computes identically; claims across shapes (a prefill against steps)
hold within float tolerance, as batched against unbatched does (DESIGN.md, invariant 2).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serving import Unbatched, assert_fails, create, position

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc

pytestmark = pytest.mark.every_model

DEPTH, EVERY = 12, 5  # small, so that random rewinds cross checkpoints and reach the depth


@pytest.fixture(scope="module")
def ops_server(bundle):
    from serving import RunningServer

    from rnnserve.server.settings import Settings

    running = RunningServer(bundle, Settings(listen="127.0.0.1:0", rewind_depth=DEPTH, rewind_checkpoint_every=EVERY,
                                             prefix_cache_min_tokens=4))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def ops(ops_server):
    with grpc.insecure_channel(ops_server.address) as channel:
        yield rnnserve_pb2_grpc.InferenceStub(channel)


def vocab_size(stub) -> int:
    return stub.GetModel(pb.GetModelRequest()).vocab_size


def step(stub, session_id: str, *tokens: int, top_k: int = 5) -> pb.StepResponse:
    return stub.Step(pb.StepRequest(session_id=session_id, token_ids=list(tokens), top_k=top_k))


def steps(stub, session_id: str, tokens) -> pb.StepResponse:
    """One token at a time, as a streaming client reads: the last answer."""
    for token in tokens:
        answer = step(stub, session_id, token)
    return answer


def same(a: pb.Prediction, b: pb.Prediction) -> bool:
    return list(a.token_ids) == list(b.token_ids) and list(a.probabilities) == list(b.probabilities)


def close_to(a: pb.Prediction, b: pb.Prediction) -> None:
    assert list(a.token_ids) == list(b.token_ids)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)


# Fork --------------------------------------------------------------------------------------------------------------

def test_forks_start_where_the_source_is_and_then_diverge_only_by_their_own_input(ops):
    source = create(ops, prompt_token_ids=[3, 1, 4, 1, 5])
    forks = ops.ForkSession(pb.ForkSessionRequest(session_id=source, count=3)).sessions
    assert [fork.position for fork in forks] == [5, 5, 5]
    assert len({fork.session_id for fork in forks} | {source}) == 4
    twins = [step(ops, session, 9) for session in (source, *(fork.session_id for fork in forks))]
    assert all(same(twin.prediction, twins[0].prediction) for twin in twins)
    # each now reads something else: each equals a session that read exactly its own tokens
    for offset, session in enumerate((source, *(fork.session_id for fork in forks))):
        answer = step(ops, session, 10 + offset)
        reference = create(ops, prompt_token_ids=[3, 1, 4, 1, 5])
        step(ops, reference, 9)
        assert same(answer.prediction, step(ops, reference, 10 + offset).prediction)
    assert position(ops, source) == 7


def test_a_fork_at_a_stale_position_or_past_the_cap_makes_nothing(start_server):
    running = start_server(max_sessions=4)
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        source = create(stub, prompt_token_ids=[1, 2])
        assert_fails(lambda: stub.ForkSession(pb.ForkSessionRequest(session_id=source, expected_position=1)),
                     grpc.StatusCode.FAILED_PRECONDITION, "POSITION_MISMATCH")
        assert_fails(lambda: stub.ForkSession(pb.ForkSessionRequest(session_id=source, count=4)),
                     grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED")
        assert_fails(lambda: stub.ForkSession(pb.ForkSessionRequest(session_id=source, count=65)),
                     grpc.StatusCode.INVALID_ARGUMENT, field="count")
        assert len(running.engine.table) == 1 and position(stub, source) == 2
        assert len(stub.ForkSession(pb.ForkSessionRequest(session_id=source, count=3)).sessions) == 3


# Reset -------------------------------------------------------------------------------------------------------------

def test_reset_returns_a_session_to_zeros_keeping_its_id(ops):
    session = create(ops, prompt_token_ids=[7, 8, 9, 10])
    reset = ops.ResetSession(pb.ResetSessionRequest(session_id=session, expected_position=4))
    assert (reset.session_id, reset.position, reset.rewindable) == (session, 0, 0)
    fresh = create(ops)
    assert same(steps(ops, session, [2, 3]).prediction, steps(ops, fresh, [2, 3]).prediction)
    assert_fails(lambda: ops.ResetSession(pb.ResetSessionRequest(session_id=session, expected_position=0)),
                 grpc.StatusCode.FAILED_PRECONDITION, "POSITION_MISMATCH")
    assert position(ops, session) == 2


# Rewind ------------------------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_rewind_equals_never_having_read_the_undone_tokens(ops, data):
    size = vocab_size(ops)
    read = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=30), label="read")
    undo = data.draw(st.integers(1, min(DEPTH, len(read))), label="undo")
    session = create(ops)
    steps(ops, session, read)
    rewound = ops.RewindSession(pb.RewindSessionRequest(session_id=session, tokens=undo, expected_position=len(read)))
    assert rewound.session.position == len(read) - undo
    kept = read[: len(read) - undo]
    if kept:  # a session that read only the kept tokens predicts the same (a replay's calls may differ in shape)
        never = ops.CreateSession(pb.CreateSessionRequest(prompt_token_ids=kept))
        close_to(rewound.prediction, never.prediction)
        reference = never.session.session_id
    else:
        assert not rewound.HasField("prediction")  # back at position 0 of zeros: nothing predicted
        reference = create(ops)
    after = step(ops, session, read[-1])
    assert after.position == len(kept) + 1
    close_to(after.prediction, step(ops, reference, read[-1]).prediction)


def test_rewind_to_each_checkpoint_boundary_and_past_the_depth(ops, bundle):
    size = vocab_size(ops)
    tokens = [(7 * i + 3) % size for i in range(40)]
    session = create(ops)
    steps(ops, session, tokens)
    info = ops.GetSession(pb.GetSessionRequest(session_id=session))
    assert info.rewindable == DEPTH
    error, details = assert_fails(lambda: ops.RewindSession(pb.RewindSessionRequest(session_id=session,
                                                                                     tokens=DEPTH + 1)),
                                  grpc.StatusCode.OUT_OF_RANGE, "REWIND_BEYOND_DEPTH")
    assert details.metadata["rewindable"] == str(DEPTH) and str(DEPTH) in error.details()
    assert position(ops, session) == 40  # the refusal changed nothing
    for target in (35, 30, 28):  # checkpoints lie at multiples of EVERY; 28 is between two
        rewound = ops.RewindSession(pb.RewindSessionRequest(session_id=session, tokens=position(ops, session) - target))
        reference = Unbatched(bundle)
        reference.feed(tokens[:target])
        ids, probabilities = reference.top_k(5)
        assert rewound.session.position == target and list(rewound.prediction.token_ids) == ids
        np.testing.assert_allclose(rewound.prediction.probabilities, probabilities, atol=1e-5)
    # the history was cut at the rewind: only what lies before 28 can still be undone, within the depth
    assert ops.GetSession(pb.GetSessionRequest(session_id=session)).rewindable <= DEPTH


def test_rewind_into_a_long_prompt_replays_it_from_the_start(ops):
    size = vocab_size(ops)
    prompt = [(5 * i + 1) % size for i in range(25)]
    session = create(ops, prompt_token_ids=prompt)
    rewound = ops.RewindSession(pb.RewindSessionRequest(session_id=session, tokens=3))
    again = ops.CreateSession(pb.CreateSessionRequest(prompt_token_ids=prompt[:-3]))
    close_to(rewound.prediction, again.prediction)


# Score and peek ----------------------------------------------------------------------------------------------------

def test_score_equals_the_log_probabilities_of_stepping_the_same_tokens_and_changes_nothing(ops, bundle):
    size = vocab_size(ops)
    prompt = [4, 9, 2]
    session = create(ops, prompt_token_ids=prompt)
    candidates = [[1, 2, 3, 4], [5, 6, 7, 8], [9], [(i * 3) % size for i in range(7)]]
    response = ops.Score(pb.ScoreRequest(session_id=session, expected_position=3,
                                         continuations=[pb.Continuation(token_ids=c) for c in candidates]))
    assert response.position == 3 and position(ops, session) == 3
    for candidate, scored in zip(candidates, response.scores):
        reference = Unbatched(bundle)
        reference.feed(prompt)
        expected_logprobs, expected_ranks = [], []
        for token in candidate:
            logits = reference.logits.astype(np.float64)
            logprobs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            expected_logprobs.append(logprobs[token])
            expected_ranks.append(1 + int(np.sum(logits > logits[token])))
            reference.feed([token])
        assert list(scored.token_ids) == candidate
        np.testing.assert_allclose(scored.logprobs, expected_logprobs, atol=1e-5)
        assert list(scored.ranks) == expected_ranks
        assert scored.total_logprob == pytest.approx(sum(expected_logprobs), abs=1e-4)
    # the session goes on as if nothing had been scored
    fresh = create(ops, prompt_token_ids=prompt)
    assert same(step(ops, session, 1).prediction, step(ops, fresh, 1).prediction)


def test_score_refuses_what_it_cannot_score_naming_the_field(ops):
    session = create(ops)
    assert_fails(lambda: ops.Score(pb.ScoreRequest(session_id=session, continuations=[pb.Continuation(text="a")])),
                 grpc.StatusCode.INVALID_ARGUMENT, field="continuations")  # nothing read: nothing predicts a token
    step(ops, session, 1)
    assert_fails(lambda: ops.Score(pb.ScoreRequest(session_id=session)), grpc.StatusCode.INVALID_ARGUMENT,
                 field="continuations")
    assert_fails(lambda: ops.Score(pb.ScoreRequest(session_id=session, continuations=[pb.Continuation()])),
                 grpc.StatusCode.INVALID_ARGUMENT, field="continuations[0]")
    assert_fails(lambda: ops.Score(pb.ScoreRequest(session_id=session,
                                                   continuations=[pb.Continuation(token_ids=[10_000])])),
                 grpc.StatusCode.INVALID_ARGUMENT, field="continuations[0].token_ids")
    assert position(ops, session) == 1


def test_peek_answers_as_a_step_would_and_commits_nothing(ops):
    session = create(ops, prompt_token_ids=[2, 4])
    peeked = ops.Peek(pb.StepRequest(session_id=session, token_ids=[6, 8], top_k=3))
    assert peeked.position == 4 and position(ops, session) == 2
    stepped = ops.Step(pb.StepRequest(session_id=session, token_ids=[6, 8], top_k=3))
    assert same(peeked.prediction, stepped.prediction)


# Prefix-state cache and named states -------------------------------------------------------------------------------

def test_a_cached_prompt_equals_a_cold_read_bit_exactly_whole_and_within_tolerance_as_a_prefix(ops, start_server):
    size = vocab_size(ops)
    prompt = [(11 * i + 2) % size for i in range(30)]
    first = ops.CreateSession(pb.CreateSessionRequest(prompt_token_ids=prompt))
    assert first.cached_prompt_tokens == 0
    whole = ops.CreateSession(pb.CreateSessionRequest(prompt_token_ids=prompt))
    assert whole.cached_prompt_tokens == 30 and whole.session.position == 30
    assert same(whole.prediction, first.prediction)
    longer = ops.CreateSession(pb.CreateSessionRequest(prompt_token_ids=prompt + [1, 2, 3]))
    assert longer.cached_prompt_tokens == 30 and longer.session.position == 33
    cold_server = start_server(prefix_cache_entries=0)
    with grpc.insecure_channel(cold_server.address) as channel:
        cold = rnnserve_pb2_grpc.InferenceStub(channel)
        cold_session = cold.CreateSession(pb.CreateSessionRequest(prompt_token_ids=prompt))
        assert cold_session.cached_prompt_tokens == 0
        assert same(cold_session.prediction, whole.prediction)
        cold_longer = cold.CreateSession(pb.CreateSessionRequest(prompt_token_ids=prompt + [1, 2, 3]))
        assert cold_longer.cached_prompt_tokens == 0  # the cache is off: nothing was kept
        # 30 cached tokens and 3 read against 33 in one call: calls of other shapes, equal within float tolerance
        # (bit-exact for a recurrent ONNX op, which computes every prefill step by step; a parallel scan does not)
        close_to(cold_longer.prediction, longer.prediction)
        close_to(step(cold, cold_longer.session.session_id, 5).prediction,
                 step(ops, longer.session.session_id, 5).prediction)
    # sessions from the cache step on exactly like the one that read the prompt
    assert same(step(ops, whole.session.session_id, 4).prediction, step(ops, first.session.session_id, 4).prediction)


def test_a_named_state_is_an_initial_state_and_a_cached_prefix(ops):
    greeting = [5, 6, 7, 8, 9, 10]
    named = ops.RegisterState(pb.RegisterStateRequest(name="greeting", prompt_token_ids=greeting))
    assert (named.name, named.source, named.prompt_tokens) == ("greeting", "registered", 6)
    assert "greeting" in [state.name for state in ops.ListStates(pb.ListStatesRequest()).states]
    from_state = ops.CreateSession(pb.CreateSessionRequest(initial_state="greeting", prompt_token_ids=[1]))
    assert from_state.session.initial_state == "greeting" and from_state.session.position == 1
    read = ops.CreateSession(pb.CreateSessionRequest(prompt_token_ids=greeting + [1]))
    assert read.cached_prompt_tokens == 6  # pinned in the cache under its prompt
    close_to(from_state.prediction, read.prediction)
    session = from_state.session.session_id
    reset = ops.ResetSession(pb.ResetSessionRequest(session_id=session))
    assert reset.position == 0 and reset.initial_state == "greeting"
    assert same(step(ops, session, 1).prediction, from_state.prediction)
    ops.DeleteState(pb.DeleteStateRequest(name="greeting"))
    assert_fails(lambda: ops.CreateSession(pb.CreateSessionRequest(initial_state="greeting")),
                 grpc.StatusCode.NOT_FOUND, "STATE_NOT_FOUND")
    # sessions started from it keep their own copy; its prompt is no longer pinned
    assert same(step(ops, session, 2).prediction, step(ops, read.session.session_id, 2).prediction)
    assert ops.CreateSession(pb.CreateSessionRequest(prompt_token_ids=greeting)).cached_prompt_tokens == 0
    assert_fails(lambda: ops.RegisterState(pb.RegisterStateRequest(name="no spaces", prompt_token_ids=[1])),
                 grpc.StatusCode.INVALID_ARGUMENT, field="name")
    assert_fails(lambda: ops.DeleteState(pb.DeleteStateRequest(name="greeting")), grpc.StatusCode.NOT_FOUND,
                 "STATE_NOT_FOUND")


def test_a_state_shipped_in_the_bundle_starts_sessions_and_cannot_be_deleted(bundle, tmp_path, start_server):
    import shutil

    from rnnserve.bundle import BundleError, load_bundle
    from rnnserve.initial_states import add_initial_state, load_initial_states

    shutil.copytree(bundle.path, tmp_path / "bundle")
    shipped = add_initial_state(tmp_path / "bundle", "fox", "The quick brown fox")
    assert shipped.prompt == "The quick brown fox"
    running = start_server(load_bundle(tmp_path / "bundle"))
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        [listed] = stub.ListStates(pb.ListStatesRequest()).states
        assert (listed.name, listed.source, listed.prompt_text) == ("fox", "bundle", "The quick brown fox")
        from_state = stub.CreateSession(pb.CreateSessionRequest(initial_state="fox", prompt_text=" j"))
        assert from_state.session.position == len(bundle.vocab.encode(" j"))  # 2 characters, 1 or 2 subwords
        read = stub.CreateSession(pb.CreateSessionRequest(prompt_text="The quick brown fox j"))
        # its prompt is pinned in the prefix-state cache
        assert read.cached_prompt_tokens == len(bundle.vocab.encode("The quick brown fox"))
        assert same(from_state.prediction, read.prediction)
        assert_fails(lambda: stub.DeleteState(pb.DeleteStateRequest(name="fox")), grpc.StatusCode.FAILED_PRECONDITION,
                     "STATE_IS_SHIPPED")
    (tmp_path / "bundle" / "states" / "fox.f32").write_bytes(b"\0" * 12)
    with pytest.raises(BundleError, match="fox"):
        load_initial_states(load_bundle(tmp_path / "bundle"))


def test_a_session_from_a_named_state_generates_from_position_zero(ops):
    prompt = [4, 8, 15, 16, 23, 42 % vocab_size(ops)]
    ops.RegisterState(pb.RegisterStateRequest(name="numbers", prompt_token_ids=prompt))
    from_state = create(ops, initial_state="numbers")
    read = create(ops, prompt_token_ids=prompt)
    generated = [[token.token_id for token in ops.Generate(pb.GenerateRequest(session_id=session, max_tokens=8))]
                 for session in (from_state, read)]
    assert generated[0] == generated[1] and len(generated[0]) == 8
    assert position(ops, from_state) == 8 and position(ops, read) == len(prompt) + 8


def test_forks_past_the_owners_own_cap_make_none(start_server):
    running = start_server(max_sessions_per_identity=3)
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        source = create(stub, prompt_token_ids=[1, 2])
        assert_fails(lambda: stub.ForkSession(pb.ForkSessionRequest(session_id=source, count=3)),
                     grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED")
        assert len(running.engine.table) == 1
        assert len(stub.ForkSession(pb.ForkSessionRequest(session_id=source, count=2)).sessions) == 2
