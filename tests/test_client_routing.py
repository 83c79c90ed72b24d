"""The clients name the session of every call that has one in `x-session-id` metadata, for a routing proxy, and
send each service its own token."""

from rnnserve.client.connection import ADMIN, SESSION_HEADER, Connection
from rnnserve.v1 import rnnserve_pb2 as pb


def test_a_call_naming_a_session_carries_its_id_beside_the_token():
    options = Connection(token="t" * 16).call_options(None, pb.StepRequest(session_id="abc", text="x"))
    assert options["metadata"] == (("authorization", "Bearer " + "t" * 16), (SESSION_HEADER, "abc"))


def test_a_call_naming_no_session_goes_anywhere():
    assert Connection().call_options(None, pb.CreateSessionRequest(prompt_text="x"))["metadata"] == ()
    assert Connection().call_options(None, pb.StepBatchRequest())["metadata"] == ()


def test_admin_calls_carry_the_admin_token_and_no_other_call_does():
    both = Connection(token="caller-token", admin_token="admin-token")
    assert both.call_options(None, pb.ListModelsRequest())["metadata"] == (("authorization", "Bearer caller-token"),)
    assert both.call_options(None, pb.LoadModelRequest(name="m", version="2"), ADMIN)["metadata"] == \
        (("authorization", "Bearer admin-token"),)
    assert Connection(token="caller-token").metadata_for(ADMIN) == (("authorization", "Bearer caller-token"),)
    assert Connection(admin_token="admin-token").metadata == ()  # never sent to Inference
