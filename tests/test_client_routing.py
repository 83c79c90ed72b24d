"""The clients name the session of every call that has one in `x-session-id` metadata, for a routing proxy."""

from rnnserve.client.connection import SESSION_HEADER, Connection
from rnnserve.v1 import rnnserve_pb2 as pb


def test_a_call_naming_a_session_carries_its_id_beside_the_token():
    options = Connection(token="t" * 16).call_options(None, pb.StepRequest(session_id="abc", text="x"))
    assert options["metadata"] == (("authorization", "Bearer " + "t" * 16), (SESSION_HEADER, "abc"))


def test_a_call_naming_no_session_goes_anywhere():
    assert Connection().call_options(None, pb.CreateSessionRequest(prompt_text="x"))["metadata"] == ()
    assert Connection().call_options(None, pb.StepBatchRequest())["metadata"] == ()
