"""/v1/completions through the openai Python client: the same text as Generate over gRPC with the
same prompt and parameters, streamed or not, stop strings left out as OpenAI does, and the
unsupported fields refused by name."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from faces import ALICE as TOKEN, GrpcFace, serve_both_faces
from rnnserve.server.faces.web.completions import StopsLeftOut
from rnnserve.v1 import rnnserve_pb2 as pb

pytestmark = pytest.mark.every_model


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    running = serve_both_faces(bundle, tmp_path_factory.mktemp("tokens"))
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key=TOKEN,
                       max_retries=0) as opened:
        yield opened


def generated(server, prompt: str, **fields) -> list[dict]:
    """What Generate over gRPC answers for a new session with `prompt`."""
    face = GrpcFace(server.address, TOKEN)
    session = face.call("CreateSession", {"prompt_text": prompt})["session"]["session_id"]
    tokens = face.call("Generate", {"session_id": session, **fields})
    face.close()
    return tokens


def test_a_completion_is_generate_over_grpc(server, client, bundle):
    expected = generated(server, "The quick", max_tokens=12, temperature=0.8, seed=3)
    completion = client.completions.create(model=bundle.name, prompt="The quick", max_tokens=12, temperature=0.8,
                                           seed=3, logprobs=0)
    choice = completion.choices[0]
    assert choice.text == "".join(token["text"] for token in expected) and choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == pytest.approx([math.log(token["probability"]) for token in expected])
    # each token's text starts where the text before it ends (a subword token may add none: half a character)
    assert choice.logprobs.text_offset == [sum(len(token["text"]) for token in expected[:i]) for i in range(12)]
    assert completion.object == "text_completion" and completion.model == bundle.name
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (len(bundle.vocab.encode("The quick")),
                                                                                    12)


def test_a_streamed_completion_sends_the_same_text_in_chunks_then_done(server, client, bundle):
    whole = client.completions.create(model="", prompt="The", max_tokens=20, temperature=1.0, seed=9)
    chunks = list(client.completions.create(model="", prompt="The", max_tokens=20, temperature=1.0, seed=9,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20
    raw = httpx.post(f"http://127.0.0.1:{server.server.http_port}/v1/completions",
                     headers={"authorization": f"Bearer {TOKEN}"},
                     json={"prompt": "The", "max_tokens": 3, "stream": True})
    assert raw.text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("stream", [False, True])
def test_the_stop_string_ends_the_text_and_is_left_out(server, client, stream):
    greedy = "".join(token["text"] for token in generated(server, "The quick", max_tokens=40))
    stop = greedy[12:14]
    expected = greedy[:greedy.index(stop)]
    answer = client.completions.create(model="", prompt="The quick", max_tokens=40, temperature=0, stop=[stop, "@@@"],
                                       stream=stream)
    chunks = list(answer) if stream else [answer]
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_held_tokens_go_out_once_no_stop_string_can_begin_in_them():
    stops = StopsLeftOut(["abc", "x"])
    token = lambda text, finish=pb.FINISH_REASON_UNSPECIFIED: pb.GenerateResponse(text=text, finish_reason=finish)  # noqa: E731
    assert stops.push(token("q")) == []
    assert stops.push(token("a")) == []
    assert [t.text for t in stops.push(token("b"))] == ["q"]
    assert [t.text for t in stops.push(token("c", pb.FINISH_REASON_STOP))] == []  # "abc" left out
    assert [t.text for t in StopsLeftOut([]).push(token("z"))] == ["z"]


@pytest.mark.parametrize(("field", "value"), [("n", 2), ("best_of", 3), ("echo", True), ("suffix", "!"),
                                              ("presence_penalty", 0.5), ("logprobs", 3)])
def test_unsupported_fields_are_refused_by_name(client, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="", prompt="The", max_tokens=2, **{field: value})
    error = refused.value.body
    assert refused.value.status_code == 400 and error["status"] == "INVALID_ARGUMENT"
    assert error["details"][1]["field_violations"][0]["field"] == field


def test_completions_need_the_token_and_leave_no_session(server):
    url = f"http://127.0.0.1:{server.server.http_port}/v1/completions"
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.post(url, json={"prompt": "a"}).status_code == 401
    held = len(server.engine.table)
    assert httpx.post(url, json={"prompt": "a", "max_tokens": 3}, headers=auth).status_code == 200
    assert httpx.post(url, json={"prompt": "a", "max_tokens": 3, "stream": True}, headers=auth).status_code == 200
    assert httpx.post(url, json={"prompt": "a", "max_tokens": 10 ** 6}, headers=auth).status_code == 400
    assert httpx.post(url, json={"prompt": "a", "model": "nope"}, headers=auth).status_code == 404
    assert len(server.engine.table) == held
