"""One message per field, stating the field's real range whatever the value: over gRPC (the Python client,
which sends `wire_numbers`' stand-in for a number the wire cannot hold) and over HTTP (JSON, whose numbers
have no wire type), and through /v1/completions in OpenAI's field names."""

from __future__ import annotations

import httpx
import pytest

from faces import ALICE, Failed, HttpFace
from rnnserve.client import Client, InvalidArgument
from rnnserve.server.settings import Settings
from rnnserve.wire_numbers import MAX_UINT32_LIMIT

HUGE = 10**12  # beyond uint32 and int32, within int64: the client's stand-in goes


@pytest.fixture
def http(faces_server):
    face = HttpFace(f"http://127.0.0.1:{faces_server.server.http_port}", ALICE)
    yield face
    face.close()


def violation(details: list[dict]) -> tuple[str, str]:
    """The BadRequest's one field violation, as (field, description)."""
    bad_request = next(d for d in details if d["@type"].endswith("google.rpc.BadRequest"))
    (only,) = bad_request["field_violations"]
    return only["field"], only["description"]


def over_grpc(call) -> tuple[str, str]:
    with pytest.raises(InvalidArgument) as refused:
        call()
    (only,) = refused.value.field_violations
    return only.field, only.description


def over_http(http: HttpFace, rpc: str, request: dict) -> tuple[str, str]:
    with pytest.raises(Failed) as refused:
        http.call(rpc, request)
    assert refused.value.http_code == 400 and refused.value.status == "INVALID_ARGUMENT"
    return violation(refused.value.details)


def test_top_k_states_the_vocabulary_range_for_any_value(alice, http, bundle):
    vocab = len(bundle.vocab)
    session = alice.session("The")
    said = {over_grpc(lambda v=v: session.step("a", top_k=v)) for v in (vocab + 1, HUGE, -1)}
    said |= {over_http(http, "Step", {"session_id": session.id, "text": "a", "top_k": v})
             for v in (vocab + 1, HUGE, -1, 1e300, 10**300, "-1", "1e300", "9" * 300)}
    assert said == {("top_k", f"must be in [1, {vocab}], the vocabulary size (0 means 5)")}
    assert session.step("a").position == 4  # none of them moved the session


def test_max_tokens_states_the_servers_limit_for_any_value(alice, http):
    session = alice.session("The")
    said = {over_grpc(lambda v=v: list(session.generate(v))) for v in (0, 4097, HUGE, -5)}
    said |= {over_http(http, "Generate", {"session_id": session.id, "max_tokens": v}) for v in (0, 4097, -1, 1e300)}
    assert said == {("max_tokens", "must be in [1, 4096]")}
    assert session.info().position == 3


def test_ttl_and_token_ids_state_their_ranges_for_any_value(alice, http, bundle):
    said = {over_grpc(lambda v=v: alice.session(ttl=v)) for v in (86_401, HUGE, -1)}
    said |= {over_http(http, "CreateSession", {"ttl_seconds": v}) for v in (86_401, -1, 1e300)}
    assert said == {("ttl_seconds", "at most 86400 (0 means the default, 3600)")}
    vocab = len(bundle.vocab)
    session = alice.session("The")
    said = {over_grpc(lambda v=v: session.step([v])) for v in (vocab, HUGE, -HUGE)}
    said |= {over_http(http, "Step", {"session_id": session.id, "token_ids": [1, v]}) for v in (vocab, -1, 1e300)}
    assert said == {("token_ids", f"ids must be in [0, {vocab - 1}], the model's vocabulary")}


def test_every_uint32_limit_refuses_the_stand_in(alice, http):
    """The stand-in is above every limit: fork's count and rewind's tokens too (the others are above)."""
    session = alice.session("The")
    assert over_http(http, "ForkSession", {"session_id": session.id, "count": -1})[0] == "count"
    with pytest.raises(Failed) as too_far:
        http.call("RewindSession", {"session_id": session.id, "tokens": 1e300})
    assert too_far.value.status == "OUT_OF_RANGE" and "3" in too_far.value.message  # what it can undo
    with pytest.raises(ValueError, match="max_generate_tokens must be at most"):
        Settings(max_generate_tokens=MAX_UINT32_LIMIT + 1)
    with pytest.raises(ValueError, match="max_ttl_seconds must be at most"):
        Settings(max_ttl_seconds=MAX_UINT32_LIMIT + 1)


def test_a_field_without_a_stand_in_states_the_wire_range_quoting_the_number_compactly(alice, http):
    session = alice.session("The")
    field, description = over_http(http, "Generate", {"session_id": session.id, "seed": 1e300})
    assert (field, description) == ("seed", "must be in [0, 18446744073709551615], got 1e+300")
    assert over_grpc(lambda: list(session.generate(3, seed=-1))) == (
        "seed", "must be in [0, 18446744073709551615], got -1")
    field, description = over_http(http, "Step", {"session_id": session.id, "text": "a", "request_id": -(10**300)})
    assert field == "request_id" and description.endswith("got -1e+300")
    assert over_http(http, "Step", {"session_id": session.id, "text": "a", "top_k": 2.5}) == (
        "top_k", "must be a whole number, got 2.5")


def test_an_unknown_field_is_named_and_the_fields_listed_as_the_proto_spells_them(alice, http):
    session = alice.session("The")
    field, description = over_http(http, "Step", {"session_id": session.id, "text": "a", "topk": 3})
    assert field == "topk"
    assert description == ("not a field of StepRequest; its fields are session_id, token_ids, text, top_k, "
                           "temperature, expected_position, request_id")
    field, description = over_http(http, "StepBatch", {"steps": [{"session_id": session.id, "txt": "a"}]})
    assert field == "steps[0].txt" and "session_id, token_ids, text" in description
    assert http.call("Step", {"session_id": session.id, "text": "a", "topK": 3})["position"] == "4"  # JSON's own name


def test_a_python_text_that_is_not_utf8_is_refused_naming_its_field_before_any_call(alice):
    session = alice.session("The")
    assert over_grpc(lambda: session.step("To be\udcff"))[0] == "text"  # argv's undecodable bytes, as Python has them
    assert over_grpc(lambda: list(session.generate(2, stop=["ok", "\udcfe"])))[0] == "stop"
    assert session.step("a").position == 4


def test_an_empty_text_is_named_as_the_text_the_caller_gave(alice, http):
    session = alice.session()
    assert over_grpc(lambda: session.step(""))[0] == "text"
    assert over_grpc(lambda: session.step([]))[0] == "token_ids"
    assert over_grpc(lambda: list(session.generate(3, tokens="")))[0] == "text"
    assert over_http(http, "Step", {"session_id": session.id, "text": ""})[0] == "text"
    assert over_http(http, "Generate", {"session_id": session.id, "text": "", "max_tokens": 2})[0] == "text"
    assert over_http(http, "Generate", {"session_id": session.id, "max_tokens": 2})[0] == "token_ids"
    assert session.info().position == 0


@pytest.fixture
def completions(faces_server):
    with httpx.Client(base_url=f"http://127.0.0.1:{faces_server.server.http_port}/v1",
                      headers={"authorization": f"Bearer {ALICE}"}, timeout=30) as opened:
        def post(body: dict) -> httpx.Response:
            return opened.post("/completions", json=body)
        yield post


def refused_field(response: httpx.Response) -> tuple[str, str]:
    assert response.status_code == 400, response.text
    return violation(response.json()["error"]["details"])


@pytest.mark.parametrize("body", [{}, {"prompt": ""}, {"prompt": []}, {"prompt": [""]}, {"prompt": "a" * 16_385},
                                  {"prompt": [1, 10**12]}, {"prompt": [-1]}])
def test_completions_name_the_prompt_whatever_is_wrong_with_it(completions, body):
    assert refused_field(completions(body))[0] == "prompt"


def test_completions_state_max_tokens_range_and_take_at_most_four_stop_strings(completions):
    said = {refused_field(completions({"prompt": "The", "max_tokens": v})) for v in (0, -1, 4097, 10**30)}
    assert said == {("max_tokens", "must be in [1, 4096]")}
    assert refused_field(completions({"prompt": "The", "stop": list("abcde")})) == (
        "stop", "at most 4 strings (OpenAI's limit), got 5")
    assert completions({"prompt": "The", "stop": list("abcd"), "max_tokens": 3}).status_code == 200
    assert refused_field(completions({"prompt": "The", "bogus": 1}))[0] == "bogus"


def test_completions_refuse_a_bad_max_tokens_before_opening_a_session(start_server):
    running = start_server(http_listen="127.0.0.1:0", max_sessions=1)
    with Client(running.address) as client, client.session("The"):  # the table is full
        answer = httpx.post(f"http://127.0.0.1:{running.server.http_port}/v1/completions",
                            json={"prompt": "The", "max_tokens": 0}, timeout=30)
        assert refused_field(answer) == ("max_tokens", "must be in [1, 4096]")  # not 429: nothing was opened
        assert len(client.models()) == 1 and client.models()[0].sessions == 1
