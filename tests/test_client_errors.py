"""The client's one error mapping: every reason in the proto has its exception, details are read back."""

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from rnnserve.client import errors
from rnnserve.v1 import rnnserve_pb2 as pb

EXPECTED = {
    "SESSION_NOT_FOUND": (grpc.StatusCode.NOT_FOUND, errors.SessionNotFound),
    "SESSION_EXPIRED": (grpc.StatusCode.NOT_FOUND, errors.SessionExpired),
    "SESSION_EVICTED": (grpc.StatusCode.NOT_FOUND, errors.SessionEvicted),
    "SESSION_LOST": (grpc.StatusCode.NOT_FOUND, errors.SessionLost),
    "MODEL_NOT_FOUND": (grpc.StatusCode.NOT_FOUND, errors.ModelNotFound),
    "POSITION_MISMATCH": (grpc.StatusCode.FAILED_PRECONDITION, errors.PositionMismatch),
    "INVALID_ARGUMENT": (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
    "CAPACITY_EXHAUSTED": (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.CapacityExhausted),
    "SHUTTING_DOWN": (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
    "REWIND_BEYOND_DEPTH": (grpc.StatusCode.OUT_OF_RANGE, errors.RewindBeyondDepth),
    "INCOMPATIBLE_STATE": (grpc.StatusCode.FAILED_PRECONDITION, errors.IncompatibleState),
    "STATE_NOT_FOUND": (grpc.StatusCode.NOT_FOUND, errors.StateNotFound),
    "STATE_IS_SHIPPED": (grpc.StatusCode.FAILED_PRECONDITION, errors.StateIsShipped),
    "MODEL_RETIRING": (grpc.StatusCode.FAILED_PRECONDITION, errors.ModelRetiring),
    "MODEL_IS_DEFAULT": (grpc.StatusCode.FAILED_PRECONDITION, errors.ModelIsDefault),
    "MODEL_REFUSED": (grpc.StatusCode.FAILED_PRECONDITION, errors.ModelRefused),
}


def packed(*messages) -> list[any_pb2.Any]:
    result = []
    for message in messages:
        detail = any_pb2.Any()
        detail.Pack(message)
        result.append(detail)
    return result


def status(code: grpc.StatusCode, message: str, *details) -> status_pb2.Status:
    return status_pb2.Status(code=code.value[0], message=message, details=packed(*details))


def test_every_reason_in_the_proto_is_mapped():
    reasons = {name for name in pb.ErrorReason.keys() if name != "ERROR_REASON_UNSPECIFIED"}
    assert reasons == set(EXPECTED)


@pytest.mark.parametrize("reason", sorted(EXPECTED))
def test_reason_chooses_the_exception(reason):
    code, expected = EXPECTED[reason]
    info = error_details_pb2.ErrorInfo(reason=reason, domain=errors.DOMAIN)
    error = errors.error_from_status(status(code, "it failed", info))
    assert type(error) is expected
    assert (error.code, error.reason, error.details) == (code, reason, "it failed")


def test_gone_sessions_are_all_session_not_found():
    assert issubclass(errors.SessionExpired, errors.SessionNotFound)
    assert issubclass(errors.SessionEvicted, errors.SessionNotFound)


def test_code_alone_chooses_a_fallback():
    assert type(errors.error_from_status(status(grpc.StatusCode.UNAVAILABLE, "down"))) is errors.Unavailable
    assert type(errors.error_from_status(status(grpc.StatusCode.INTERNAL, "bug"))) is errors.RnnserveError


def test_reason_of_another_domain_is_ignored():
    info = error_details_pb2.ErrorInfo(reason="SESSION_EXPIRED", domain="elsewhere.example")
    error = errors.error_from_status(status(grpc.StatusCode.NOT_FOUND, "gone", info))
    assert type(error) is errors.NotFound and error.reason is None


def test_details_are_read_back():
    info = error_details_pb2.ErrorInfo(reason="POSITION_MISMATCH", domain=errors.DOMAIN,
                                       metadata={"actual_position": "12"})
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000))
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="top_k", description="must be in 1..64")])
    error = errors.error_from_status(status(grpc.StatusCode.FAILED_PRECONDITION, "moved", info, retry, bad))
    assert error.actual_position == 12
    assert error.retry_after == 1.5
    assert error.field_violations == (errors.FieldViolation("top_k", "must be in 1..64"),)
