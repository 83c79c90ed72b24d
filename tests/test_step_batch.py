"""StepBatch's limits on the message as a whole: each is refused INVALID_ARGUMENT before any step runs.

A session named twice, more steps than the maximum batch size, or an answer that could exceed the
4 MiB a gRPC client accepts by default: each refusal names `steps` (or the repeated step) and the
limit, and leaves every session of the message where it was.
"""

import grpc
import pytest

from rnnserve.server.faces.convert import CLIENT_RECEIVE_BYTES, STEP_ANSWER_BYTES, candidate_bytes
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import assert_fails, create, position, status_details

PROMPT = "The quick brown fox jumps over the lazy dog. " # 45 characters


def _positions(stub, sessions: list[str]) -> list[int]:
    return [position(stub, session_id) for session_id in sessions]


def _refused(stub, steps: list[pb.StepRequest], field: str) -> grpc.RpcError:
    error, _ = assert_fails(lambda: stub.StepBatch(pb.StepBatchRequest(steps=steps)),
                            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", field)
    return error


def test_a_session_named_twice_refuses_the_whole_message(stub):
    """The issue's repro: a session at 45 stepped twice in one StepBatch went to 47; now nothing moves."""
    sessions = [create(stub, prompt_text=PROMPT) for _ in range(3)]
    steps = [pb.StepRequest(session_id=s, text="a") for s in sessions] + [pb.StepRequest(session_id=sessions[1],
                                                                                         text="b")]
    error = _refused(stub, steps, "steps[3].session_id")
    assert sessions[1] in error.details() and "steps[1]" in error.details()
    assert _positions(stub, sessions) == [45, 45, 45]


@pytest.fixture
def small_batches(start_server):
    running = start_server(max_batch_size=4)
    with grpc.insecure_channel(running.address) as channel:
        yield rnnserve_pb2_grpc.InferenceStub(channel)


def test_more_steps_than_the_maximum_batch_size_are_refused(small_batches):
    sessions = [create(small_batches, prompt_text="ab") for _ in range(5)]
    error = _refused(small_batches, [pb.StepRequest(session_id=s, text="c") for s in sessions], "steps")
    assert "at most 4 steps" in error.details() and "got 5" in error.details()
    assert _positions(small_batches, sessions) == [2] * 5
    results = small_batches.StepBatch(pb.StepBatchRequest(
        steps=[pb.StepRequest(session_id=s, text="c") for s in sessions[:4]])).results
    assert [r.position for r in results] == [3] * 4  # the maximum itself is served


def test_a_hundred_thousand_copies_of_one_step_change_nothing(stub):
    """The issue's repro: these advanced the session to 76,992 while the caller got DEADLINE_EXCEEDED."""
    session_id = create(stub, prompt_text=PROMPT)
    steps = [pb.StepRequest(session_id=session_id, token_ids=[1])] * 100_000
    error = _refused(stub, steps, "steps")
    assert "at most 256 steps" in error.details()
    assert position(stub, session_id) == 45


@pytest.fixture
def huge_batches(start_server):
    """A maximum batch size so large that only the answer's size bounds a StepBatch."""
    running = start_server(max_batch_size=100_000)
    with grpc.insecure_channel(running.address) as channel:
        yield rnnserve_pb2_grpc.InferenceStub(channel), running


def _batch(sessions: list[str], count: int) -> list[pb.StepRequest]:
    """`count` steps of top_k 1: `sessions` first, then sessions that do not exist (answered NOT_FOUND in-band)."""
    ids = sessions + [f"{n:032x}" for n in range(count - len(sessions))]
    return [pb.StepRequest(session_id=s, token_ids=[2], top_k=1) for s in ids]


def test_a_batch_whose_answer_could_exceed_the_client_limit_is_refused_and_one_that_fits_arrives(huge_batches):
    """The issue's repro: 4,000 sessions advanced, and their 4.3 MB answer was lost to the 4 MiB limit."""
    stub, running = huge_batches
    sessions = [create(stub, prompt_text="ab") for _ in range(3)]
    per_step = STEP_ANSWER_BYTES + 32 + candidate_bytes(running.model.bundle.vocab.tokens)
    fits = CLIENT_RECEIVE_BYTES // per_step
    error = _refused(stub, _batch(sessions, fits + 1), "steps")
    assert str(CLIENT_RECEIVE_BYTES) in error.details() and str((fits + 1) * per_step) in error.details()
    assert _positions(stub, sessions) == [2, 2, 2]
    results = stub.StepBatch(pb.StepBatchRequest(steps=_batch(sessions, fits))).results
    assert len(results) == fits and [r.position for r in results[:3]] == [3, 3, 3]
    assert _positions(stub, sessions) == [3, 3, 3]


def _answer_kinds(stub, vocab: int) -> list[pb.StepRequest]:
    """A step for every kind of answer, each as long as it gets: the largest prediction and each error."""
    def live() -> str:
        return create(stub, prompt_text="ab")
    longest_id = "f" * 128
    return [pb.StepRequest(session_id=live(), text="x", top_k=vocab),
            pb.StepRequest(session_id=live(), text="x", expected_position=2**63 - 1, request_id=2**64 - 1),
            pb.StepRequest(session_id=live(), text="x", top_k=vocab + 1),
            pb.StepRequest(session_id=live(), text="x", temperature=1e9),
            pb.StepRequest(session_id=live(), token_ids=[vocab, -1]),
            pb.StepRequest(session_id=live(), token_ids=[1], text="x"),
            pb.StepRequest(session_id=live()),
            pb.StepRequest(session_id=longest_id, text="x"),
            pb.StepRequest(session_id=longest_id + "f", text="x"),
            pb.StepRequest(text="x")]


def test_every_kind_of_answer_fits_the_bound_a_batch_is_sized_by(stub, bundle):
    """The refusal above is only as good as its per-step bound: no answer, prediction or error, exceeds it."""
    vocab = len(bundle.vocab)
    steps = _answer_kinds(stub, vocab)
    results = stub.StepBatch(pb.StepBatchRequest(steps=steps)).results
    assert [r.HasField("error") for r in results] == [False] + [True] * (len(steps) - 1)
    assert {status_details(r.error)[0].reason for r in results[1:]} == {
        "POSITION_MISMATCH", "INVALID_ARGUMENT", "SESSION_NOT_FOUND"}
    for step, result in zip(steps, results):
        encoded = pb.StepBatchResponse(results=[result]).ByteSize()
        top_k = min(step.top_k or 5, vocab)
        assert encoded <= STEP_ANSWER_BYTES + len(step.session_id) + top_k * candidate_bytes(bundle.vocab.tokens)
