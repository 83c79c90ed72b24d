"""--max-sessions-per-identity: one identity cannot crowd out, or under evict-oldest evict, another's sessions.

An identity at its cap is refused RESOURCE_EXHAUSTED (reason CAPACITY_EXHAUSTED, QuotaFailure subject
"identity") whatever --when-full says, and every session, its own and the others', stays as it was.
"""

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import assert_fails

ALICE = (("authorization", "Bearer token-of-alice-0123456789"),)
BOB = (("authorization", "Bearer token-of-bob-0123456789"),)


@pytest.fixture(params=["refuse", "evict-oldest"])
def stub(request, start_server, tmp_path):
    """Two identities sharing a table of 4 sessions, 2 each at most."""
    tokens = tmp_path / "tokens"
    tokens.write_text("token-of-alice-0123456789 alice\ntoken-of-bob-0123456789 bob\n")
    running = start_server(auth_tokens_file=tokens, max_sessions=4, when_full=request.param,
                           max_sessions_per_identity=2)
    with grpc.insecure_channel(running.address) as channel:
        yield rnnserve_pb2_grpc.InferenceStub(channel)


def _create(stub, metadata) -> str:
    return stub.CreateSession(pb.CreateSessionRequest(prompt_text="The"), metadata=metadata).session.session_id


def _positions(stub, sessions: list[str], metadata) -> list[int]:
    return [stub.GetSession(pb.GetSessionRequest(session_id=s), metadata=metadata).position for s in sessions]


def _quota_violation(error: grpc.RpcError) -> error_details_pb2.QuotaFailure.Violation:
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            return failure.violations[0]
    raise AssertionError(f"no QuotaFailure in {error}")


def test_an_identity_at_its_cap_is_refused_and_no_session_changes(stub):
    bobs = [_create(stub, BOB) for _ in range(2)]  # the least recently active: evict-oldest's victims but for the cap
    alices = [_create(stub, ALICE) for _ in range(2)]
    error, _ = assert_fails(lambda: _create(stub, ALICE), grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED")
    violation = _quota_violation(error)
    assert (violation.subject, violation.description) == ("identity", "at most 2 sessions")
    assert _positions(stub, alices, ALICE) == _positions(stub, bobs, BOB) == [3, 3]

    stub.CloseSession(pb.CloseSessionRequest(session_id=alices[0]), metadata=ALICE)
    assert _positions(stub, [_create(stub, ALICE)], ALICE) == [3]  # its own close made room for it
    assert _positions(stub, bobs, BOB) == [3, 3]
