"""The real server on a loopback port: lifecycle, streams, batches, retries, concurrency and status codes."""

import asyncio
import queue
import random
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import assert_fails, assert_prediction, create, position, slow_model, status_details

pytestmark = pytest.mark.every_model


# Sessions -----------------------------------------------------------------------------------------

def test_session_lifecycle(stub, bundle):
    created = stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=120))
    assert not created.HasField("prediction")
    session = created.session
    assert session.position == 0 and session.model == bundle.name
    assert session.expires.seconds - session.last_active.seconds in (119, 120, 121)
    stepped = stub.Step(pb.StepRequest(session_id=session.session_id, text="fox"))
    assert stepped.position == 3
    described = stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
    assert described.position == 3 and described.last_active.ToNanoseconds() >= session.created.ToNanoseconds()
    assert stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id)).position == 3
    assert_fails(lambda: stub.GetSession(pb.GetSessionRequest(session_id=session.session_id)),
                 grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert_fails(lambda: stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id)),
                 grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")


def test_prompt_prediction_equals_in_process_onnxruntime(stub, bundle, unbatched):
    created = stub.CreateSession(pb.CreateSessionRequest(prompt_text="The lazy", top_k=3))
    reference = unbatched(bundle)
    reference.feed(bundle.vocab.encode("The lazy"))
    assert created.session.position == len(bundle.vocab.encode("The lazy"))  # 8 characters, or fewer subwords
    assert_prediction(created.prediction, reference, k=3)


def test_models_are_described_from_the_manifest(stub, bundle):
    [model] = stub.ListModels(pb.ListModelsRequest()).models
    sizes = bundle.manifest["sizes"]  # layers and hidden size: a recurrent cell's, absent (0) for other architectures
    assert (model.name, model.cell, model.layers, model.hidden_size, model.vocab_size) == \
           (bundle.name, bundle.cell, sizes.get("layers", 0), sizes.get("hidden_size", 0), len(bundle.vocab))
    assert model.sha256 == bundle.sha256 and model.is_default
    assert model.state_bytes_per_session == bundle.state_bytes_per_session
    assert model.vocabulary == bundle.vocab.kind
    assert [(s.name, tuple(s.shape), s.dtype) for s in model.states] == [(s.name, s.shape, s.dtype) for s in bundle.states]
    assert stub.GetModel(pb.GetModelRequest(name=bundle.name)) == model
    assert_fails(lambda: stub.GetModel(pb.GetModelRequest(name="gpt-9")), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


# Streams and batches ------------------------------------------------------------------------------

def test_stream_answers_pipelined_steps_in_order(stub, bundle, unbatched):
    session_id = create(stub)
    tokens = [int(t) for t in bundle.vocab.encode("over the dog")]
    requests = [pb.StepRequest(session_id=session_id, token_ids=[t], request_id=100 + i) for i, t in enumerate(tokens)]
    responses = list(stub.Stream(iter(requests)))  # all sent before any answer is read
    reference = unbatched(bundle)
    for index, (token, response) in enumerate(zip(tokens, responses, strict=True)):
        reference.feed([token])
        assert (response.request_id, response.position, response.session_id) == (100 + index, index + 1, session_id)
        assert_prediction(response.prediction, reference)


def test_sessions_interleaved_on_one_stream(stub, bundle, unbatched):
    rng = random.Random(3)
    sessions = [create(stub) for _ in range(8)]
    plans = {s: [rng.randrange(len(bundle.vocab)) for _ in range(rng.randrange(3, 9))] for s in sessions}
    order = [s for s in sessions for _ in plans[s]]
    rng.shuffle(order)
    cursors = dict.fromkeys(sessions, 0)
    requests = []
    for session_id in order:
        requests.append(pb.StepRequest(session_id=session_id, token_ids=[plans[session_id][cursors[session_id]]],
                                       request_id=len(requests)))
        cursors[session_id] += 1
    responses = list(stub.Stream(iter(requests)))
    references = {s: unbatched(bundle) for s in sessions}
    for request, response in zip(requests, responses, strict=True):
        references[request.session_id].feed(request.token_ids)
        assert (response.request_id, response.session_id) == (request.request_id, request.session_id)
        assert_prediction(response.prediction, references[request.session_id])
    assert all(position(stub, s) == len(plans[s]) for s in sessions)


def test_a_failed_step_is_answered_in_band_and_the_stream_goes_on(stub):
    session_id = create(stub)
    requests = [pb.StepRequest(session_id=session_id, text="a", request_id=1),
                pb.StepRequest(session_id=session_id, token_ids=[10_000], request_id=2),
                pb.StepRequest(session_id="no-such-session", text="a", request_id=3),
                pb.StepRequest(session_id=session_id, text="b", request_id=4)]
    responses = list(stub.Stream(iter(requests)))
    assert [r.request_id for r in responses] == [1, 2, 3, 4]
    assert [r.error.code for r in responses] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                 grpc.StatusCode.NOT_FOUND.value[0], 0]
    assert status_details(responses[1].error)[1] == ["token_ids"]
    assert status_details(responses[2].error)[0].reason == "SESSION_NOT_FOUND"
    assert responses[3].position == 2


def test_a_failed_in_band_step_reports_where_its_session_stands(stub):
    """Not 0: the position of the caller's session, which the failed step left as it was (0 for no session)."""
    first, second = create(stub, prompt_text="abc"), create(stub, prompt_text="abcde")
    steps = [pb.StepRequest(session_id=first, token_ids=[10_000]),  # refused on arrival
             pb.StepRequest(session_id=second, text="x", expected_position=2),  # refused in its turn
             pb.StepRequest(session_id="no-such-session", text="a")]
    for responses in (list(stub.Stream(iter(steps))), stub.StepBatch(pb.StepBatchRequest(steps=steps)).results):
        assert all(r.HasField("error") for r in responses)
        assert [r.position for r in responses] == [3, 5, 0]
    assert (position(stub, first), position(stub, second)) == (3, 5)


def test_step_batch_answers_each_step_at_its_index(stub, bundle, unbatched):
    sessions = [create(stub) for _ in range(5)]
    steps = [pb.StepRequest(session_id=s, token_ids=[i + 1], request_id=i) for i, s in enumerate(sessions)]
    refused = create(stub, prompt_text="ab")
    steps.insert(2, pb.StepRequest(session_id=refused, top_k=10_000, text="x"))  # a bad step among good ones
    results = stub.StepBatch(pb.StepBatchRequest(steps=steps)).results
    assert len(results) == len(steps)
    assert status_details(results[2].error)[1] == ["top_k"]
    assert results[0].position == 1 and position(stub, refused) == 2
    for index, session_id in enumerate(sessions[1:], start=1):
        reference = unbatched(bundle)
        reference.feed([index + 1])
        result = results[index if index < 2 else index + 1]
        assert result.session_id == session_id and not result.HasField("error")
        assert_prediction(result.prediction, reference)


# Retries and concurrency --------------------------------------------------------------------------

def test_an_exact_retry_is_answered_from_the_record_and_a_stale_step_is_refused(stub):
    session_id = create(stub, prompt_token_ids=[1, 2, 3])
    first = stub.Step(pb.StepRequest(session_id=session_id, token_ids=[4, 5], expected_position=3))
    again = stub.Step(pb.StepRequest(session_id=session_id, token_ids=[4, 5], expected_position=3))
    assert again == first and position(stub, session_id) == 5
    _, info = assert_fails(lambda: stub.Step(pb.StepRequest(session_id=session_id, token_ids=[6], expected_position=3)),
                           grpc.StatusCode.FAILED_PRECONDITION, "POSITION_MISMATCH")
    assert info.metadata["actual_position"] == "5"
    assert position(stub, session_id) == 5


def test_concurrent_calls_on_one_session_apply_once_each_in_one_order(stub, channel, bundle, unbatched):
    session_id = create(stub)
    tokens = list(range(1, 41))

    def unary(token):
        return token, stub.Step(pb.StepRequest(session_id=session_id, token_ids=[token]))

    def streamed(chunk):
        requests = [pb.StepRequest(session_id=session_id, token_ids=[t]) for t in chunk]
        return list(zip(chunk, stub.Stream(iter(requests))))

    with ThreadPoolExecutor(8) as pool:
        unary_answers = list(pool.map(unary, tokens[:20]))
        stream_answers = [pair for chunk in pool.map(streamed, [tokens[20:30], tokens[30:]]) for pair in chunk]
    answers = sorted(unary_answers + stream_answers, key=lambda pair: pair[1].position)
    assert [answer.position for _, answer in answers] == list(range(1, 41))  # each applied exactly once
    reference = unbatched(bundle)
    for token, answer in answers:  # and the state followed exactly that order
        reference.feed([token])
        assert_prediction(answer.prediction, reference)


# Status codes ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "field"), [
    ({"token_ids": [10_000]}, "token_ids"),
    ({"token_ids": [-1]}, "token_ids"),
    ({}, "token_ids"),
    ({"token_ids": [1], "text": "a"}, "text"),
    ({"text": "a", "top_k": 10_000}, "top_k"),
    ({"text": "a", "temperature": -1.0}, "temperature"),
    ({"text": "a", "temperature": 101.0}, "temperature"),
    ({"text": "a", "temperature": float("nan")}, "temperature"),
    ({"text": "a", "expected_position": -2}, "expected_position"),
])
def test_invalid_steps_name_the_field_and_change_nothing(stub, fields, field):
    session_id = create(stub, prompt_text="ab")
    assert_fails(lambda: stub.Step(pb.StepRequest(session_id=session_id, **fields)),
                 grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", field)
    assert position(stub, session_id) == 2


@pytest.mark.parametrize(("request_", "field"), [
    (pb.CreateSessionRequest(ttl_seconds=10**7), "ttl_seconds"),
    (pb.CreateSessionRequest(prompt_text="a", prompt_token_ids=[1]), "prompt_text"),
    (pb.GetSessionRequest(), "session_id"),
    (pb.GetSessionRequest(session_id="x" * 129), "session_id"),  # quoted back in NOT_FOUND: bounded
    (pb.CreateSessionRequest(model="m" * 129), "model"),
    (pb.GenerateRequest(session_id="x", max_tokens=0), "max_tokens"),
    (pb.GenerateRequest(session_id="x", max_tokens=5, top_p=1.5), "top_p"),
    (pb.GenerateRequest(session_id="x", max_tokens=5, stop=[""]), "stop"),
])
def test_invalid_requests_of_other_calls_name_the_field(stub, request_, field):
    method = {pb.CreateSessionRequest: stub.CreateSession, pb.GetSessionRequest: stub.GetSession,
              pb.GenerateRequest: lambda r: list(stub.Generate(r))}[type(request_)]
    assert_fails(lambda: method(request_), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", field)


def test_text_over_the_limit_names_the_limit(start_server):
    running = start_server(max_input_chars=4, max_input_tokens=4)
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        session_id = create(stub)
        error, _ = assert_fails(lambda: stub.Step(pb.StepRequest(session_id=session_id, text="hello")),
                                grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "text")
        assert "at most 4" in error.details()
        assert_fails(lambda: stub.Step(pb.StepRequest(session_id=session_id, token_ids=[1] * 5)),
                     grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "token_ids")


def test_unknown_closed_and_evicted_sessions_are_told_apart(start_server):
    running = start_server(max_sessions=2, when_full="evict-oldest")
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        closed = create(stub)
        stub.CloseSession(pb.CloseSessionRequest(session_id=closed))
        oldest, recent = create(stub), create(stub)
        stub.Step(pb.StepRequest(session_id=recent, text="a"))
        create(stub)  # the table is full: the least recently active session makes room
        for session_id, reason in [("never-was", "SESSION_NOT_FOUND"), (closed, "SESSION_NOT_FOUND"),
                                   (oldest, "SESSION_EVICTED")]:
            assert_fails(lambda: stub.Step(pb.StepRequest(session_id=session_id, text="a")),
                         grpc.StatusCode.NOT_FOUND, reason)
        assert position(stub, recent) == 1


def test_an_idle_session_expires_after_its_ttl(stub):
    session_id = create(stub, ttl_seconds=1)
    time.sleep(1.1)
    assert_fails(lambda: stub.Step(pb.StepRequest(session_id=session_id, text="a")),
                 grpc.StatusCode.NOT_FOUND, "SESSION_EXPIRED")


def test_a_full_table_refuses_with_resource_exhausted(start_server):
    running = start_server(max_sessions=1)
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        create(stub)
        assert_fails(lambda: create(stub), grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED")


def test_a_missed_deadline_leaves_the_session_unchanged(start_server, bundle, unbatched):
    running = start_server()
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        session_id = create(stub, prompt_text="fox")
        slow_model(running, 0.3)
        assert_fails(lambda: stub.Step(pb.StepRequest(session_id=session_id, text="es"), timeout=0.1),
                     grpc.StatusCode.DEADLINE_EXCEEDED)
        time.sleep(0.4)  # the model call finished meanwhile; its result must have been dropped
        assert position(stub, session_id) == 3
        answer = stub.Step(pb.StepRequest(session_id=session_id, text="y"))
    reference = unbatched(bundle)
    reference.feed(bundle.vocab.encode("foxy"))
    assert answer.position == 4
    assert_prediction(answer.prediction, reference)


def test_shutting_down_refuses_new_work_and_turns_health_not_serving(start_server):
    running = start_server()
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        session_id = create(stub)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        outgoing = queue.Queue()
        stream = stub.Stream(iter(outgoing.get, None))
        outgoing.put(pb.StepRequest(session_id=session_id, text="a"))
        assert next(stream).position == 1
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(5.0), running.loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # so that the stop need not wait out its grace period for the watch
        outgoing.put(pb.StepRequest(session_id=session_id, text="b"))  # on a stream opened before: refused in-band
        refused = next(stream)
        assert refused.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert status_details(refused.error)[0].reason == "SHUTTING_DOWN"
        outgoing.put(None)
        assert list(stream) == []
        stopping.result(10)
