"""A session belongs to the identity that created it: to any other, it answers exactly as one that never existed.

Two bearer tokens on one server: B tries every call that names a session on A's session, and
gets the answer a made-up id gets, code, message and details alike (the id itself aside); A's
session then goes on exactly as its twin that B never touched. (Identities by client
certificate are tested in test_tls.py.)
"""

import secrets

import grpc
import pytest
from grpc_status import rpc_status

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc

A = (("authorization", "Bearer token-of-alice-0123456789"),)
B = (("authorization", "Bearer token-of-bob-0123456789"),)


@pytest.fixture
def stub(start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("token-of-alice-0123456789 alice\ntoken-of-bob-0123456789 bob\n")
    running = start_server(auth_tokens_file=tokens)
    with grpc.insecure_channel(running.address) as channel:
        yield rnnserve_pb2_grpc.InferenceStub(channel)


def every_call(stub, session_id: str, metadata) -> list[str]:
    """The answer to each call naming `session_id`, as text with the id replaced by "ID"."""
    step = pb.StepRequest(session_id=session_id, token_ids=[1, 2], request_id=7)
    calls = [
        lambda: stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=metadata),
        lambda: stub.Step(step, metadata=metadata),
        lambda: list(stub.Stream(iter([step, step]), metadata=metadata)),
        lambda: stub.StepBatch(pb.StepBatchRequest(steps=[step]), metadata=metadata),
        lambda: list(stub.Generate(pb.GenerateRequest(session_id=session_id, max_tokens=3), metadata=metadata)),
        lambda: list(stub.Generate(pb.GenerateRequest(session_id=session_id, text="a", max_tokens=2),
                                   metadata=metadata)),
        lambda: stub.CloseSession(pb.CloseSessionRequest(session_id=session_id), metadata=metadata),
    ]
    answers = []
    for call in calls:
        try:
            answer = str(call())
        except grpc.RpcError as error:
            answer = f"{error.code()} {error.details()} {rpc_status.from_call(error)}"
        answers.append(answer.replace(session_id, "ID"))
    return answers


def test_another_identitys_session_answers_like_one_that_never_existed(stub):
    session, twin = (stub.CreateSession(pb.CreateSessionRequest(prompt_text="The"), metadata=A).session.session_id
                     for _ in range(2))
    never_existed = secrets.token_hex(16)
    expected = every_call(stub, never_existed, B)
    assert all("does not exist" in answer for answer in expected), expected
    assert every_call(stub, session, B) == expected

    assert stub.GetSession(pb.GetSessionRequest(session_id=session), metadata=A).position == len("The")
    steps = [stub.Step(pb.StepRequest(session_id=s, text=" quick"), metadata=A) for s in (session, twin)]
    assert steps[0].prediction == steps[1].prediction and steps[0].position == steps[1].position


def test_a_closed_session_is_told_closed_only_to_its_owner(stub):
    session = stub.CreateSession(pb.CreateSessionRequest(), metadata=A).session.session_id
    stub.CloseSession(pb.CloseSessionRequest(session_id=session), metadata=A)
    assert every_call(stub, session, B) == every_call(stub, secrets.token_hex(16), B)
    with pytest.raises(grpc.RpcError) as closed:
        stub.GetSession(pb.GetSessionRequest(session_id=session), metadata=A)
    assert closed.value.code() == grpc.StatusCode.NOT_FOUND and "was closed" in closed.value.details()
