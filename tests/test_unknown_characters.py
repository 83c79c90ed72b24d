"""Characters outside the model's vocabulary are read as the unknown token, and every answer to a text says
how many: Step, Peek, Stream, StepBatch, CreateSession, Generate (its first token) and Score, over gRPC (the
Python client) and HTTP, and none for ids."""

from __future__ import annotations

import httpx
import pytest

from faces import ALICE, HttpFace, read_events
from rnnserve.vocab import UNKNOWN_ID

TEXT = "Zoë the fox"  # "Z" and "ë" are outside the tiny model's vocabulary (conftest's TINY_TEXT)
UNKNOWN = 2


def test_the_text_really_has_that_many_unknown_characters(bundle):
    assert list(bundle.vocab.encode(TEXT)).count(UNKNOWN_ID) == UNKNOWN


def test_every_answer_to_a_text_counts_its_unknown_characters_over_grpc(alice, bundle):
    created = alice.session(TEXT)
    assert created.prediction.unknown_characters == UNKNOWN
    assert created.step(TEXT).unknown_characters == UNKNOWN
    assert created.step("the").unknown_characters == 0
    assert created.step(list(bundle.vocab.encode(TEXT))).unknown_characters == 0  # ids: the caller chose <unk>
    assert created.peek(TEXT).unknown_characters == UNKNOWN
    assert [s.unknown_characters for s in created.score(TEXT, "fox", "Zz")] == [UNKNOWN, 0, 1]
    other = alice.session("the")
    assert [p.unknown_characters for p in alice.step_batch([(created, TEXT), (other, "fox")])] == [UNKNOWN, 0]
    with alice.stream() as stream:
        assert [stream.step(created, text).unknown_characters for text in ("ë", "e")] == [1, 0]
    tokens = list(created.generate(3, tokens=TEXT))
    assert [token.unknown_characters for token in tokens] == [UNKNOWN, 0, 0]  # told on the first token only
    assert alice.register_state("zoe", TEXT).unknown_characters == UNKNOWN
    assert {state.name: state.unknown_characters for state in alice.states()}["zoe"] == 0  # a listing reads nothing


def test_a_retried_step_counts_them_again(alice):
    session = alice.session("the")
    first = session.step(TEXT)
    session.position -= len(TEXT)  # the client resends the step it never saw answered: the server replays it
    replayed = session.step(TEXT)
    assert replayed == first and replayed.unknown_characters == UNKNOWN


def test_http_answers_carry_the_count(faces_server):
    http = HttpFace(f"http://127.0.0.1:{faces_server.server.http_port}", ALICE)
    try:
        created = http.call("CreateSession", {"prompt_text": TEXT})
        assert created["unknown_characters"] == UNKNOWN
        session = created["session"]["session_id"]
        assert http.call("Step", {"session_id": session, "text": "é"})["unknown_characters"] == 1
        assert http.call("Step", {"session_id": session, "token_ids": [0]})["unknown_characters"] == 0
        tokens = http.call("Generate", {"session_id": session, "text": TEXT, "max_tokens": 2})
        assert [token["unknown_characters"] for token in tokens] == [UNKNOWN, 0]
    finally:
        http.close()


def test_completions_usage_counts_the_prompts_unknown_characters(faces_server):
    url = f"http://127.0.0.1:{faces_server.server.http_port}/v1/completions"
    headers = {"authorization": f"Bearer {ALICE}"}
    answer = httpx.post(url, json={"prompt": TEXT, "max_tokens": 2}, headers=headers, timeout=30).json()
    assert answer["usage"]["unknown_characters"] == UNKNOWN and answer["usage"]["prompt_tokens"] == len(TEXT)
    streamed = read_events(httpx.post(url, json={"prompt": "the", "max_tokens": 2, "stream": True,
                                                 "stream_options": {"include_usage": True}},
                                      headers=headers, timeout=30).text.replace("data: [DONE]", "").strip())
    assert streamed[-1]["usage"]["unknown_characters"] == 0
