"""Every error type reaches the caller as its status code with machine-readable details."""

import asyncio
import logging

import grpc
import pytest
from google.rpc import error_details_pb2

from rnnserve.server.core import errors
from rnnserve.server.core.errors import (CapacityExhausted, IncompatibleState, InvalidArgument, ModelNotFound,
                                    PositionMismatch, RewindBeyondDepth, RnnserveError, ServerFault, SessionEvicted,
                                    SessionExpired, SessionLost, SessionNotFound, SessionUnavailable, ShuttingDown,
                                    StateIsShipped, StateNotFound,
                                    to_status)
from rnnserve.server.faces.guard import Guarded
from rnnserve.v1 import rnnserve_pb2

# One instance of every error type, with the code and ErrorInfo reason the caller must see.
EXAMPLES = [
    (SessionNotFound("s1"), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"),
    (SessionExpired("s1"), grpc.StatusCode.NOT_FOUND, "SESSION_EXPIRED"),
    (SessionEvicted("s1"), grpc.StatusCode.NOT_FOUND, "SESSION_EVICTED"),
    (SessionLost("s1", "the session store restarted without it", "r1/ab", 12), grpc.StatusCode.NOT_FOUND,
     "SESSION_LOST"),
    (ModelNotFound("big", ["tiny"]), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
    (InvalidArgument("top_k", "must be in [1, 47]"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (PositionMismatch("s1", expected=3, actual=5), grpc.StatusCode.FAILED_PRECONDITION, "POSITION_MISMATCH"),
    (CapacityExhausted(10), grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED"),
    (errors.IdentityQuotaExhausted(2), grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED"),
    (ShuttingDown(), grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
    (ServerFault("model call failed"), grpc.StatusCode.INTERNAL, None),
    (RewindBeyondDepth("s1", tokens=9, rewindable=4, depth=32), grpc.StatusCode.OUT_OF_RANGE, "REWIND_BEYOND_DEPTH"),
    (IncompatibleState("another model"), grpc.StatusCode.FAILED_PRECONDITION, "INCOMPATIBLE_STATE"),
    (StateNotFound("sonnet", ["ode"]), grpc.StatusCode.NOT_FOUND, "STATE_NOT_FOUND"),
    (StateIsShipped("sonnet"), grpc.StatusCode.FAILED_PRECONDITION, "STATE_IS_SHIPPED"),
    (SessionUnavailable("s1", "moved to the session store"), grpc.StatusCode.UNAVAILABLE, None),
    (errors.ModelRetiring("tiny", "1", "2"), grpc.StatusCode.FAILED_PRECONDITION, "MODEL_RETIRING"),
    (errors.ModelIsDefault("tiny", "2"), grpc.StatusCode.FAILED_PRECONDITION, "MODEL_IS_DEFAULT"),
    (errors.ModelRefused("models/tiny/3", "its sha256 does not match"), grpc.StatusCode.FAILED_PRECONDITION,
     "MODEL_REFUSED"),
]


def all_error_types(base=RnnserveError):
    for subclass in base.__subclasses__():
        yield subclass
        yield from all_error_types(subclass)


def unpacked(status, detail_type):
    found = []
    for detail in status.details:
        if detail.Is(detail_type.DESCRIPTOR):
            message = detail_type()
            detail.Unpack(message)
            found.append(message)
    return found


def test_the_examples_cover_every_error_type():
    assert {type(error) for error, _, _ in EXAMPLES} == set(all_error_types())


def test_every_reason_is_one_the_proto_documents():
    documented = set(rnnserve_pb2.ErrorReason.keys())
    assert {reason for _, _, reason in EXAMPLES if reason} <= documented


@pytest.mark.parametrize(("error", "code", "reason"), EXAMPLES, ids=lambda value: type(value).__name__)
def test_status_carries_code_message_and_error_info(error, code, reason):
    status = to_status(error)
    assert status.code == code.value[0]
    assert status.message == str(error)
    infos = unpacked(status, error_details_pb2.ErrorInfo)
    if reason is None:
        assert infos == []
    else:
        assert [(i.reason, i.domain) for i in infos] == [(reason, errors.DOMAIN)]


@pytest.mark.parametrize(("error", "retriable"), [(CapacityExhausted(10), True), (ShuttingDown(), True),
                                                  (SessionNotFound("s"), False), (InvalidArgument("f", "d"), False),
                                                  (errors.IdentityQuotaExhausted(2), False)])
def test_retry_info_only_where_a_retry_may_succeed(error, retriable):
    assert bool(unpacked(to_status(error), error_details_pb2.RetryInfo)) == retriable


def test_invalid_argument_names_the_field_in_bad_request():
    status = to_status(InvalidArgument("temperature", "must be in (0, 100]"))
    [bad_request] = unpacked(status, error_details_pb2.BadRequest)
    [violation] = bad_request.field_violations
    assert (violation.field, violation.description) == ("temperature", "must be in (0, 100]")
    assert "temperature" in status.message and "100" in status.message


def test_position_mismatch_carries_the_actual_position():
    [info] = unpacked(to_status(PositionMismatch("s1", expected=3, actual=5)), error_details_pb2.ErrorInfo)
    assert info.metadata["actual_position"] == "5"
    assert info.metadata["expected_position"] == "3"


def test_an_unknown_exception_is_internal_without_its_internals(caplog):
    status = to_status(KeyError("secret internals"))
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    assert "secret" not in status.message
    assert "secret internals" in caplog.text  # but the server log has it


def test_a_write_refused_because_the_call_ended_is_the_callers_cancel(caplog):
    """grpc raises its InternalError from `context.write` when the caller's cancel or deadline
    reached the write before it reached the handler: that call ends CANCELLED, no fault logged."""
    from grpc._cython import cygrpc  # where grpc's refused-write error lives; raised here as grpc raises it

    class Servicer:
        async def Stream(self, requests, context):
            raise cygrpc.ExecuteBatchError('Failed "execute_batch"')

    reports = []
    guarded = Guarded(Servicer(), on_rpc=lambda method, code, seconds: reports.append((method, code)))
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(guarded.Stream(iter(()), context=None))
    assert reports == [("Stream", grpc.StatusCode.CANCELLED.value[0])]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
