"""Requests that do not parse (a corrupt wire format, invalid UTF-8 in a string) are INVALID_ARGUMENT.

Sent as raw bytes to every method of the Inference service: grpc's own parsing would answer
UNKNOWN for a unary call and INTERNAL from inside a stream.
"""

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor

from rnnserve.server.faces.wire import SERVICE
from rnnserve.v1 import rnnserve_pb2 as pb
from serving import assert_fails, create, position, raw_call, raw_method

CORRUPT = b"\xff\xff\xff"  # a field tag whose varint never ends
BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1, length 2, bytes that are not UTF-8


def first_field_is_a_string(method) -> bool:
    first = method.input_type.fields_by_number.get(1)
    return first is not None and first.type == FieldDescriptor.TYPE_STRING


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda method: method.name)
def test_a_request_that_does_not_parse_is_invalid(channel, method):
    for payload in (CORRUPT, BAD_UTF8) if first_field_is_a_string(method) else (CORRUPT,):
        error, _ = assert_fails(lambda: raw_call(channel, method, payload, timeout=10),
                                grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "request")
        assert method.input_type.full_name in error.details()


def test_a_stream_ends_invalid_at_a_message_that_does_not_parse_and_the_session_is_intact(channel, stub):
    session_id = create(stub)
    step = pb.StepRequest(session_id=session_id, text="a").SerializeToString()
    responses = raw_method(channel, SERVICE.methods_by_name["Stream"])(iter([step, BAD_UTF8, step]), timeout=10)
    with pytest.raises(grpc.RpcError) as ended:
        list(responses)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    before = position(stub, session_id)
    assert before in (0, 1)  # the step before it applied or withdrawn, the one after never read
    assert stub.Step(pb.StepRequest(session_id=session_id, text="b")).position == before + 1
