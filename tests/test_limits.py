"""What a stranger meets: session ids too random to guess, and requests bounded in size and length.

An oversized message is refused RESOURCE_EXHAUSTED by gRPC before it is read; an over-long
prompt INVALID_ARGUMENT by us, naming the field and the limit. Neither is ever INTERNAL, and
neither changes the session it names.
"""

import grpc
import pytest

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import assert_fails, create, position

ID_ALPHABET = set("0123456789abcdef")


def test_session_ids_carry_128_random_bits(stub):
    """Each id is 16 random bytes in hex: every one of the 128 bits varies, and no id repeats."""
    ids = [create(stub) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    values = []
    for session_id in ids:
        assert len(session_id) == 32 and set(session_id) <= ID_ALPHABET
        values.append(int(session_id, 16))
    every_bit = 2**128 - 1
    ones = zeros = 0
    for value in values:
        ones |= value
        zeros |= every_bit ^ value
    assert ones == zeros == every_bit  # across 2,000 ids, no bit stuck at 0 or at 1
    for session_id in ids:
        stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))


def test_a_message_over_the_size_limit_is_resource_exhausted_and_changes_nothing(start_server):
    running = start_server(max_message_bytes=1024)
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        session_id = create(stub)
        small, big = (pb.StepRequest(session_id=session_id, text="a" * length) for length in (1, 1024))
        calls = [lambda: stub.Step(big),
                 lambda: stub.StepBatch(pb.StepBatchRequest(steps=[small, big])),
                 lambda: list(stub.Stream(iter([big, small]))),
                 lambda: list(stub.Generate(pb.GenerateRequest(session_id=session_id, text=big.text, max_tokens=1))),
                 lambda: stub.CreateSession(pb.CreateSessionRequest(prompt_text=big.text))]
        for call in calls:
            error, _ = assert_fails(call, grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "larger than max" in error.details()
        assert position(stub, session_id) == 0
        assert stub.Step(small).position == 1


@pytest.mark.parametrize(("call", "field"), [
    (lambda stub, _: stub.CreateSession(pb.CreateSessionRequest(prompt_text="a" * 9)), "prompt_text"),
    (lambda stub, _: stub.CreateSession(pb.CreateSessionRequest(prompt_token_ids=[1] * 9)), "prompt_token_ids"),
    (lambda stub, session_id: list(stub.Generate(pb.GenerateRequest(session_id=session_id, text="a" * 9,
                                                                    max_tokens=1))), "text"),
    (lambda stub, session_id: list(stub.Generate(pb.GenerateRequest(session_id=session_id, token_ids=[1] * 9,
                                                                    max_tokens=1))), "token_ids"),
])
def test_a_prompt_over_the_length_limit_is_invalid_and_changes_nothing(start_server, call, field):
    running = start_server(max_input_chars=8, max_input_tokens=8)
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        session_id = create(stub)
        error, _ = assert_fails(lambda: call(stub, session_id), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                                field)
        assert "at most 8" in error.details()
        assert position(stub, session_id) == 0 and len(running.engine.table) == 1
