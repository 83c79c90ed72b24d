"""One suite, two faces: each scenario runs over gRPC and over HTTP/JSON against one server, and the
answers must agree (session ids and timestamps aside), errors' status, message and details included.

The HTTP face runs the servicer's own methods (server/faces/web/calls.py), so agreement is expected; these
tests are what keeps it so as routes, conversions and RPCs change.
"""

from __future__ import annotations

import secrets

import pytest

from faces import ALICE, BOB, Failed, GrpcFace, HttpFace, serve_both_faces
from serving import Unbatched

TIMESTAMPS = ("created", "last_active", "expires")


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    running = serve_both_faces(bundle, tmp_path_factory.mktemp("tokens"))
    yield running
    running.stop()


def open_face(server, kind: str, token: str | None = ALICE):
    if kind == "grpc":
        return GrpcFace(server.address, token)
    return HttpFace(f"http://127.0.0.1:{server.server.http_port}", token)


@pytest.fixture
def both(server):
    opened = {kind: open_face(server, kind) for kind in ("grpc", "http")}
    yield opened
    for face in opened.values():
        face.close()


def normal(answer, ids: list[str]):
    """`answer` with session ids replaced by their index and timestamps dropped: what two runs can share."""
    if isinstance(answer, dict):
        return {key: normal(value, ids) for key, value in answer.items() if key not in TIMESTAMPS}
    if isinstance(answer, list):
        return [normal(item, ids) for item in answer]
    if isinstance(answer, str):
        for index, session_id in enumerate(ids):
            answer = answer.replace(session_id, f"<session {index}>")
    return answer


def attempt(face, rpc: str, request):
    """The answer of a call, or its failure as (status, message, details, HTTP code or None)."""
    try:
        return face.call(rpc, request)
    except Failed as failed:
        return {"failed": failed.status, "message": failed.message, "details": failed.details}


# Scenarios: each takes a face, returns what it saw, and asserts what must hold on any face ----------

def create(face):
    answer = face.call("CreateSession", {"prompt_text": "The quick", "top_k": 5})
    assert answer["session"]["position"] == str(len("The quick"))  # int64 is a string in protobuf's JSON
    return answer, [answer["session"]["session_id"]]


def step(face):
    session = face.call("CreateSession", {"prompt_text": "The"})["session"]["session_id"]
    answers = [face.call("Step", {"session_id": session, "text": " quick", "top_k": 3}),
               face.call("Step", {"session_id": session, "token_ids": [1, 2], "temperature": 0.5,
                                  "expected_position": "9", "request_id": "7"}),
               face.call("GetSession", {"session_id": session})]
    assert answers[1]["position"] == "11" and answers[1]["request_id"] == "7"
    return answers, [session]


def generate(face):
    session = face.call("CreateSession", {"prompt_text": "The"})["session"]["session_id"]
    tokens = face.call("Generate", {"session_id": session, "text": " q", "max_tokens": 12, "temperature": 0.9,
                                    "seed": "3", "top_p": 0.9})
    assert len(tokens) == 12 and tokens[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    return tokens, [session]


def stream_and_batch(face):
    first, second = (face.call("CreateSession", {})["session"]["session_id"] for _ in range(2))
    streamed = face.call("Stream", [{"session_id": first, "text": "Th", "request_id": "1"},
                                    {"session_id": second, "text": "a", "request_id": "2"},
                                    {"session_id": first, "token_ids": [10_000], "request_id": "3"},
                                    {"session_id": first, "text": "e", "request_id": "4"}])
    assert [answer["request_id"] for answer in streamed] == ["1", "2", "3", "4"]
    assert streamed[2]["error"]["code"] == 3 and streamed[3]["position"] == "3"  # in-band INVALID_ARGUMENT
    batch = face.call("StepBatch", {"steps": [{"session_id": first, "text": " "}, {"session_id": "nope", "text": "x"},
                                              {"session_id": second, "token_ids": [4]}]})
    assert batch["results"][1]["error"]["code"] == 5
    return [streamed, batch], [first, second]


def models(face):
    listed = face.call("ListModels", {})
    one = face.call("GetModel", {"name": listed["models"][0]["name"]})
    assert one["is_default"] and one == listed["models"][0]
    return [listed, one], []


def errors(face):
    session = face.call("CreateSession", {"prompt_text": "ab"})["session"]["session_id"]
    closed = face.call("CreateSession", {})["session"]["session_id"]
    face.call("CloseSession", {"session_id": closed})
    failures = [
        attempt(face, "GetSession", {"session_id": "0" * 32}),
        attempt(face, "GetSession", {"session_id": closed}),
        attempt(face, "Step", {"session_id": session, "text": "c", "top_k": 10_000}),
        attempt(face, "Step", {"session_id": session}),
        attempt(face, "Step", {"session_id": session, "text": "c", "expected_position": "5"}),
        attempt(face, "Generate", {"session_id": session, "max_tokens": 0}),
        attempt(face, "Generate", {"session_id": session, "max_tokens": 2, "temperature": -1}),
        attempt(face, "GetModel", {"name": "no-such-model"}),
        attempt(face, "CreateSession", {"ttl_seconds": 10 ** 9}),
        attempt(face, "CreateSession", {"prompt_text": "a", "prompt_token_ids": [1]}),
    ]
    assert [failure["failed"] for failure in failures] == [
        "NOT_FOUND", "NOT_FOUND", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "FAILED_PRECONDITION",
        "INVALID_ARGUMENT", "INVALID_ARGUMENT", "NOT_FOUND", "INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert failures[4]["details"][0]["metadata"]["actual_position"] == "2"
    assert face.call("GetSession", {"session_id": session})["position"] == "2"  # no mistake changed it
    return failures, [session, closed]


def session_operations(face):
    session = face.call("CreateSession", {"prompt_text": "The quick"})["session"]["session_id"]
    forked = face.call("ForkSession", {"session_id": session, "count": 2})
    forks = [fork["session_id"] for fork in forked["sessions"]]
    answers = [forked,
               face.call("Step", {"session_id": forks[0], "text": " b"}),
               face.call("Step", {"session_id": forks[1], "text": " f"}),
               face.call("Peek", {"session_id": session, "text": " br", "top_k": 3}),
               face.call("Score", {"session_id": session, "continuations": [{"text": " brown"}, {"text": " fox"}]}),
               face.call("RewindSession", {"session_id": forks[0], "tokens": 2, "top_k": 3}),
               face.call("ResetSession", {"session_id": forks[1]})]
    exported = face.call("ExportSession", {"session_id": session})
    imported = face.call("ImportSession", {"state": exported["state"], "top_k": 3})  # base64 both ways
    answers += [exported["session"], imported]
    assert answers[5]["session"]["position"] == "9" and answers[6]["position"] == "0"
    assert face.call("GetSession", {"session_id": session})["position"] == "9"  # peek and score did not advance it
    return answers, [session, *forks, imported["session"]["session_id"]]


SCENARIOS = [create, step, generate, stream_and_batch, models, errors, session_operations]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_both_faces_agree(scenario, both):
    seen = {kind: normal(*scenario(face)) for kind, face in both.items()}
    assert seen["http"] == seen["grpc"]


def test_predictions_are_the_models(both, bundle):
    reference = Unbatched(bundle)
    reference.feed(bundle.vocab.encode("The quick"))
    ids, _ = reference.top_k(5)
    for face in both.values():
        assert face.call("CreateSession", {"prompt_text": "The quick"})["prediction"]["token_ids"] == ids


def never_existed_answers(face, session_id: str) -> list:
    calls = [("GetSession", {"session_id": session_id}), ("Step", {"session_id": session_id, "text": "a"}),
             ("Generate", {"session_id": session_id, "max_tokens": 2}),
             ("Stream", [{"session_id": session_id, "text": "a"}]),
             ("StepBatch", {"steps": [{"session_id": session_id, "text": "a"}]}),
             ("ForkSession", {"session_id": session_id}), ("ResetSession", {"session_id": session_id}),
             ("RewindSession", {"session_id": session_id, "tokens": 1}),
             ("Score", {"session_id": session_id, "continuations": [{"text": "a"}]}),
             ("Peek", {"session_id": session_id, "text": "a"}), ("ExportSession", {"session_id": session_id}),
             ("CloseSession", {"session_id": session_id})]
    return [normal(attempt(face, rpc, request), [session_id]) for rpc, request in calls]


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_another_identitys_session_answers_like_one_that_never_existed(server, kind):
    alice, bob = open_face(server, kind, ALICE), open_face(server, kind, BOB)
    session = alice.call("CreateSession", {"prompt_text": "The"})["session"]["session_id"]
    expected = never_existed_answers(bob, secrets.token_hex(16))
    assert expected[0]["failed"] == "NOT_FOUND" and "does not exist" in expected[0]["message"]
    assert never_existed_answers(bob, session) == expected
    assert alice.call("GetSession", {"session_id": session})["position"] == "3"  # untouched by bob
    alice.close(), bob.close()


@pytest.mark.parametrize("kind", ["grpc", "http"])
@pytest.mark.parametrize("token", [None, "not-a-known-token-0123"])
def test_a_call_without_a_known_token_is_unauthenticated(server, kind, token):
    face = open_face(server, kind, token)
    with pytest.raises(Failed) as failed:
        face.call("ListModels", {})
    assert failed.value.status == "UNAUTHENTICATED"
    assert failed.value.http_code == (401 if kind == "http" else None)
    face.close()


def test_a_session_created_over_http_steps_over_grpc_and_back(both):
    http, grpc_face = both["http"], both["grpc"]
    mixed = http.call("CreateSession", {"prompt_text": "The"})["session"]["session_id"]
    single = grpc_face.call("CreateSession", {"prompt_text": "The"})["session"]["session_id"]
    answers = {}
    for name, faces in (("mixed", (grpc_face, http, grpc_face)), ("single", (grpc_face,) * 3)):
        session = mixed if name == "mixed" else single
        answers[name] = [face.call("Step", {"session_id": session, "text": text})
                         for face, text in zip(faces, (" qu", "ick", " b"))]
    assert normal(answers["mixed"], [mixed]) == normal(answers["single"], [single])
    assert answers["mixed"][-1]["position"] == str(len("The quick b"))


def test_a_state_registered_over_http_is_listed_over_grpc_and_deleted(both):
    http, grpc_face = both["http"], both["grpc"]
    registered = http.call("RegisterState", {"name": "kings", "prompt_text": "KING HENRY."})
    assert registered["name"] == "kings" and registered["prompt_tokens"] == str(len("KING HENRY."))
    assert "kings" in [state["name"] for state in grpc_face.call("ListStates", {})["states"]]
    started = grpc_face.call("CreateSession", {"initial_state": "kings", "prompt_text": "\n"})
    assert started["session"]["initial_state"] == "kings"
    assert http.call("DeleteState", {"name": "kings"}) == {}
    assert "kings" not in [state["name"] for state in grpc_face.call("ListStates", {})["states"]]
