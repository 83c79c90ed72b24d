"""The Open Inference Protocol face (KServe v2, Triton's sequences) driven by tritonclient itself, unmodified.

tritonclient runs a sequence over gRPC (unary and ModelStreamInfer) and over HTTP, and its answers are
compared with the same tokens sent through rnnserve's own API; Triton users' usual mistakes get Triton's
codes and messages and change no sequence; identities keep their sequences apart.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.protobuf import descriptor_pool
from tritonclient.utils import InferenceServerException

from rnnserve.bundle import Bundle
from rnnserve.kserve_v2 import inference_pb2 as v2
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import RunningServer

V2_PORTS = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "v2_listen": "127.0.0.1:0",
            "v2_http_listen": "127.0.0.1:0"}
STEPS = [[3, 4, 5], [6], [7], [8, 9]]  # a prompt, then steps


@pytest.fixture(scope="module")
def v2_server(bundle: Bundle) -> Iterator[RunningServer]:
    running = RunningServer(bundle, Settings(**V2_PORTS))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def triton(v2_server: RunningServer) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{v2_server.server.v2_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def triton_over_http(v2_server: RunningServer) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{v2_server.server.v2_http_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def native(v2_server: RunningServer) -> Iterator[rnnserve_pb2_grpc.InferenceStub]:
    with grpc.insecure_channel(v2_server.address) as channel:
        yield rnnserve_pb2_grpc.InferenceStub(channel)


def native_predictions(stub, steps: list[list[int]], top_k: int = 5) -> list[pb.Prediction]:
    """The predictions after each step, through rnnserve's own API: the first step as the prompt."""
    created = stub.CreateSession(pb.CreateSessionRequest(prompt_token_ids=steps[0], top_k=top_k))
    predictions = [created.prediction]
    for tokens in steps[1:]:
        predictions.append(stub.Step(pb.StepRequest(session_id=created.session.session_id, token_ids=tokens,
                                                    top_k=top_k)).prediction)
    stub.CloseSession(pb.CloseSessionRequest(session_id=created.session.session_id))
    return predictions


def token_input(module, tokens: list[int], datatype: str = "INT64", shape: list[int] | None = None):
    tensor = module.InferInput("TOKEN_IDS", shape or [1, len(tokens)], datatype)
    tensor.set_data_from_numpy(np.array(tokens, dtype=np.dtype(datatype.lower())).reshape(shape or [1, len(tokens)]))
    return tensor


def flags(index: int, count: int) -> dict:
    return {"sequence_start": index == 0, "sequence_end": index == count - 1}


def assert_same(result, prediction: pb.Prediction) -> None:
    assert result.as_numpy("TOP_IDS").tolist() == [list(prediction.token_ids)]
    np.testing.assert_allclose(result.as_numpy("TOP_PROBABILITIES")[0], prediction.probabilities, rtol=1e-6)
    texts = result.as_numpy("TOP_TEXTS")[0]  # bytes; tritonclient.http gives JSON data as str
    assert [text.decode() if isinstance(text, bytes) else text for text in texts] == list(prediction.texts)


# The wire -------------------------------------------------------------------------------------------

def test_the_proto_is_tritons_wire_field_for_field():
    """Every message, field and method of inference.proto has the number, type and name of tritonclient's own
    grpc_service.proto and model_config.proto (which it registers in protobuf's default pool; ours in a pool of its
    own, so that both load in one process, as here)."""
    theirs = descriptor_pool.Default()
    for message in v2.DESCRIPTOR.message_types_by_name.values():
        _assert_same_message(message, theirs.FindMessageTypeByName(message.full_name))
    for enum in v2.DESCRIPTOR.enum_types_by_name.values():
        their_enum = theirs.FindEnumTypeByName(enum.full_name)
        assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in their_enum.values}
    their_service = theirs.FindServiceByName("inference.GRPCInferenceService")
    for method in v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        their_method = their_service.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name, method.client_streaming,
                method.server_streaming) == (their_method.input_type.full_name, their_method.output_type.full_name,
                                             their_method.client_streaming, their_method.server_streaming)


def _assert_same_message(ours, theirs) -> None:
    for field in ours.fields:
        their_field = theirs.fields_by_number[field.number]
        assert (field.name, field.type, field.is_repeated) == (their_field.name, their_field.type,
                                                               their_field.is_repeated), field.full_name
        if field.message_type is not None:
            assert field.message_type.full_name == their_field.message_type.full_name
            if not field.message_type.GetOptions().map_entry:
                _assert_same_message(field.message_type, their_field.message_type)
        if field.enum_type is not None:
            assert field.enum_type.full_name == their_field.enum_type.full_name


# Health and metadata --------------------------------------------------------------------------------

def test_health_and_metadata_answer_tritonclients_utility_calls(triton, triton_over_http, bundle):
    for client in (triton, triton_over_http):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(bundle.name) and client.is_model_ready(bundle.name, bundle.version)
        assert not client.is_model_ready("no-such-model")
    metadata = triton.get_server_metadata()
    assert metadata.name == "rnnserve" and "sequence" in metadata.extensions
    assert triton_over_http.get_server_metadata()["name"] == "rnnserve"
    model = triton_over_http.get_model_metadata(bundle.name)
    over_grpc = triton.get_model_metadata(bundle.name, as_json=True)  # protobuf's JSON: int64 as strings
    for tensor in over_grpc["inputs"] + over_grpc["outputs"]:
        tensor["shape"] = [int(size) for size in tensor["shape"]]
    assert model == over_grpc
    assert model["name"] == bundle.name and model["versions"] == [bundle.version]
    assert {tensor["name"]: (tensor["datatype"], tensor["shape"]) for tensor in model["inputs"]} == {
        "TOKEN_IDS": ("INT64", [1, -1]), "TEXT": ("BYTES", [1])}
    vocab = len(bundle.vocab)
    assert {tensor["name"]: tensor["shape"] for tensor in model["outputs"]} == {
        "TOP_IDS": [1, -1], "TOP_PROBABILITIES": [1, -1], "TOP_TEXTS": [1, -1],
        "PROBABILITIES": [1, vocab], "LOGPROBS": [1, vocab]}
    config = triton.get_model_config(bundle.name, as_json=True)["config"]
    assert config["name"] == bundle.name and config["sequence_batching"]["max_sequence_idle_microseconds"] == str(
        Settings().default_ttl_seconds * 1_000_000)
    assert triton_over_http.get_model_config(bundle.name)["sequence_batching"] == config["sequence_batching"]
    with pytest.raises(InferenceServerException, match="no-such-model"):
        triton.get_model_metadata("no-such-model")


# Sequences ------------------------------------------------------------------------------------------

def test_a_sequence_over_unary_grpc_predicts_as_rnnserves_own_api(triton, native, bundle):
    expected = native_predictions(native, STEPS)
    for index, tokens in enumerate(STEPS):
        result = triton.infer(bundle.name, [token_input(triton_grpc, tokens)], sequence_id=11, **flags(index, 4))
        assert_same(result, expected[index])
        assert result.get_response().model_version == bundle.version


def test_a_sequence_over_model_stream_infer_predicts_as_rnnserves_own_api(triton, native, bundle):
    expected = native_predictions(native, STEPS)
    answers: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for index, tokens in enumerate(STEPS):  # sent without waiting: the stream keeps them in order
            triton.async_stream_infer(bundle.name, [token_input(triton_grpc, tokens)], sequence_id="stream-seq",
                                      **flags(index, 4))
        for prediction in expected:
            result, error = answers.get(timeout=30)
            assert error is None
            assert_same(result, prediction)
    finally:
        triton.stop_stream()


@pytest.mark.parametrize("binary", [True, False], ids=["binary-data", "json-data"])
def test_a_sequence_over_http_predicts_as_rnnserves_own_api(triton_over_http, native, bundle, binary):
    expected = native_predictions(native, STEPS)
    outputs = [triton_http.InferRequestedOutput(name, binary_data=binary)
               for name in ("TOP_IDS", "TOP_PROBABILITIES", "TOP_TEXTS")]
    for index, tokens in enumerate(STEPS):
        tensor = triton_http.InferInput("TOKEN_IDS", [1, len(tokens)], "INT64")
        tensor.set_data_from_numpy(np.array([tokens], np.int64), binary_data=binary)
        result = triton_over_http.infer(bundle.name, [tensor], outputs=outputs, sequence_id=f"http-{binary}",
                                        **flags(index, 4))
        assert_same(result, expected[index])


def test_two_interleaved_sequences_keep_their_states_apart(triton, native, bundle):
    first, second = [[1], [2], [3]], [[9], [8], [7]]
    expected = {21: native_predictions(native, first), 22: native_predictions(native, second)}
    for index in range(3):
        for sequence_id, steps in ((21, first), (22, second)):
            result = triton.infer(bundle.name, [token_input(triton_grpc, steps[index])], sequence_id=sequence_id,
                                  **flags(index, 3))
            assert_same(result, expected[sequence_id][index])


def test_text_in_and_the_whole_distribution_out(triton, native, bundle):
    text = triton_grpc.InferInput("TEXT", [1], "BYTES")
    text.set_data_from_numpy(np.array(["The fox"], dtype=object))
    outputs = [triton_grpc.InferRequestedOutput(name) for name in ("PROBABILITIES", "LOGPROBS", "TOP_IDS")]
    result = triton.infer(bundle.name, [text], outputs=outputs, sequence_id=31, sequence_start=True,
                          sequence_end=True, parameters={"top_k": 3})
    expected = native.CreateSession(pb.CreateSessionRequest(prompt_text="The fox", top_k=len(bundle.vocab)))
    native.CloseSession(pb.CloseSessionRequest(session_id=expected.session.session_id))
    probabilities, logprobs = result.as_numpy("PROBABILITIES")[0], result.as_numpy("LOGPROBS")[0]
    assert probabilities.shape == (len(bundle.vocab),) and abs(probabilities.sum() - 1) < 1e-5
    np.testing.assert_allclose(np.exp(logprobs), probabilities, rtol=1e-5)
    np.testing.assert_allclose(probabilities[list(expected.prediction.token_ids)], expected.prediction.probabilities,
                               rtol=1e-6)
    assert result.as_numpy("TOP_IDS").tolist() == [list(expected.prediction.token_ids[:3])]


def test_a_sequence_may_start_from_a_named_state(triton, native, bundle):
    native.RegisterState(pb.RegisterStateRequest(name="v2-greeting", prompt_text="Hello "))
    expected = native.CreateSession(pb.CreateSessionRequest(initial_state="v2-greeting", prompt_token_ids=[5]))
    native.CloseSession(pb.CloseSessionRequest(session_id=expected.session.session_id))
    result = triton.infer(bundle.name, [token_input(triton_grpc, [5])], sequence_id=41, sequence_start=True,
                          sequence_end=True, parameters={"initial_state": "v2-greeting"})
    assert_same(result, expected.prediction)


# What Triton users send wrongly ---------------------------------------------------------------------

def test_tritons_errors_for_what_its_users_send_wrongly(triton, triton_over_http, native, bundle):
    expected = native_predictions(native, [[1], [2]])
    triton.infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=51, sequence_start=True)
    mistakes = [
        ("must specify the START flag on the first request of the sequence",
         dict(inputs=[token_input(triton_grpc, [2])], sequence_id=52)),
        ("has the START flag, but that sequence is in progress",
         dict(inputs=[token_input(triton_grpc, [2])], sequence_id=51, sequence_start=True)),
        ("inference input 'TOKEN_IDS' has datatype INT32, but model .* expects INT64",
         dict(inputs=[token_input(triton_grpc, [2], "INT32")], sequence_id=51)),
        (r"unexpected shape \[2\] for inference input 'TOKEN_IDS'",
         dict(inputs=[token_input(triton_grpc, [2, 3], shape=[2])], sequence_id=51)),
        (r"unexpected shape \[2, 1\] for inference input 'TOKEN_IDS'",
         dict(inputs=[token_input(triton_grpc, [2, 3], shape=[2, 1])], sequence_id=51)),
        ("must specify a non-zero or non-empty correlation ID", dict(inputs=[token_input(triton_grpc, [2])])),
        ("unexpected inference output 'LOGITS'",
         dict(inputs=[token_input(triton_grpc, [2])], sequence_id=51,
              outputs=[triton_grpc.InferRequestedOutput("LOGITS")])),
        (r"TOKEN_IDS: ids must be in \[0, \d+\], the model.s vocabulary",
         dict(inputs=[token_input(triton_grpc, [10_000])], sequence_id=51)),
        (r"TOKEN_IDS: ids must be in \[0, \d+\]", dict(inputs=[token_input(triton_grpc, [2 ** 40])], sequence_id=51)),
        (r"TOKEN_IDS: ids must be in \[0, \d+\]", dict(inputs=[token_input(triton_grpc, [-1])], sequence_id=51)),
        ("parameters.top_k: at least 1", dict(inputs=[token_input(triton_grpc, [2])], sequence_id=51,
                                              parameters={"top_k": 0})),
    ]
    for message, request in mistakes:
        with pytest.raises(InferenceServerException, match=message) as caught:
            triton.infer(bundle.name, **request)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    tensor = triton_http.InferInput("TOKEN_IDS", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[2]], np.int32))
    with pytest.raises(InferenceServerException, match="expects INT64") as caught:
        triton_over_http.infer(bundle.name, [tensor], sequence_id=51)
    assert caught.value.status() == "400"
    # None of them moved sequence 51: its next step predicts as the same tokens do through rnnserve's own API.
    result = triton.infer(bundle.name, [token_input(triton_grpc, [2])], sequence_id=51, sequence_end=True)
    assert_same(result, expected[1])


def test_a_failed_request_on_the_stream_is_answered_in_band_and_the_stream_goes_on(triton, bundle):
    answers: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        triton.async_stream_infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=61)
        triton.async_stream_infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=61, sequence_start=True,
                                  sequence_end=True)
        result, error = answers.get(timeout=30)
        assert result is None and "must specify the START flag" in str(error)
        result, error = answers.get(timeout=30)
        assert error is None and result.as_numpy("TOP_IDS").shape == (1, 5)
    finally:
        triton.stop_stream()


def test_an_idle_sequence_ends_with_the_session_ttl(bundle):
    running = RunningServer(bundle, Settings(**V2_PORTS, default_ttl_seconds=1, sweep_seconds=0.05))
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{running.server.v2_port}")
        client.infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=71, sequence_start=True)
        deadline = time.monotonic() + 10
        while len(running.engine.table) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(InferenceServerException, match="START flag.*expired") as caught:
            client.infer(bundle.name, [token_input(triton_grpc, [2])], sequence_id=71)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        client.close()
    finally:
        running.stop()


# Identities ----------------------------------------------------------------------------------------

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"


def test_sequences_belong_to_the_caller_and_tokens_open_the_face(tmp_path, bundle):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALICE} alice\n{BOB} bob\n")
    running = RunningServer(bundle, Settings(**V2_PORTS, auth_tokens_file=tokens))
    address, http_address = f"127.0.0.1:{running.server.v2_port}", f"127.0.0.1:{running.server.v2_http_port}"
    try:
        client = triton_grpc.InferenceServerClient(address)
        over_http = triton_http.InferenceServerClient(http_address)
        with pytest.raises(InferenceServerException, match="bearer token") as caught:
            client.infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=81, sequence_start=True)
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException, match="bearer token") as caught:
            over_http.infer(bundle.name, [token_input(triton_http, [1])], sequence_id=81, sequence_start=True)
        assert caught.value.status() == "401"
        assert over_http.is_server_live()  # health stays open to probes
        alice, bob = {"authorization": f"Bearer {ALICE}"}, {"authorization": f"Bearer {BOB}"}
        # tritonclient.http adds its own headers to the dict it is given: it gets copies.
        client.infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=81, sequence_start=True,
                     headers=alice)
        with pytest.raises(InferenceServerException, match="START flag"):  # alice's sequence 81 is not bob's
            client.infer(bundle.name, [token_input(triton_grpc, [2])], sequence_id=81, headers=bob)
        with pytest.raises(InferenceServerException, match="START flag"):
            over_http.infer(bundle.name, [token_input(triton_http, [2])], sequence_id=81, headers=dict(bob))
        client.infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=81, sequence_start=True, headers=bob)
        client.infer(bundle.name, [token_input(triton_grpc, [2])], sequence_id=81, sequence_end=True, headers=alice)
        client.infer(bundle.name, [token_input(triton_grpc, [2])], sequence_id=81, sequence_end=True, headers=bob)
        client.close()
        over_http.close()
    finally:
        running.stop()


def test_v2_calls_are_counted_with_the_others(v2_server, triton, bundle):
    import urllib.request

    triton.infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=91, sequence_start=True, sequence_end=True)
    text = urllib.request.urlopen(f"http://127.0.0.1:{v2_server.server.metrics_port}/metrics").read().decode()
    assert 'method="ModelInfer"' in text and 'code="OK"' in text


# Malformed requests: the caller's mistake, never INTERNAL, never a sequence changed ------------------

def test_malformed_grpc_requests_are_invalid_argument_and_change_no_sequence(v2_server, triton, native, bundle):
    expected = native_predictions(native, [[1], [2]])
    triton.infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=101, sequence_start=True)
    sequence = {"sequence_id": v2.InferParameter(int64_param=101)}
    tensor = v2.ModelInferRequest.InferInputTensor
    malformed = [
        b"\xff\xff\xff",  # not protobuf at all
        v2.ModelInferRequest(model_name=bundle.name, parameters=sequence, raw_input_contents=[b"\0" * 8],
                             inputs=[tensor(name="TOKEN_IDS", datatype="INT64", shape=[1, 2])]).SerializeToString(),
        v2.ModelInferRequest(model_name=bundle.name, parameters=sequence, raw_input_contents=[b"\0" * 8, b""],
                             inputs=[tensor(name="TOKEN_IDS", datatype="INT64", shape=[1, 1])]).SerializeToString(),
        v2.ModelInferRequest(model_name=bundle.name, parameters=sequence, raw_input_contents=[b"\5\0\0\0ab"],
                             inputs=[tensor(name="TEXT", datatype="BYTES", shape=[1])]).SerializeToString(),
        v2.ModelInferRequest(model_name=bundle.name, parameters=sequence,
                             inputs=[tensor(name="TOKEN_IDS", datatype="COMPLEX", shape=[1, 1])]).SerializeToString(),
        v2.ModelInferRequest(model_name=bundle.name, parameters=sequence,
                             inputs=[tensor(name="TOKEN_IDS", datatype="INT64", shape=[1, -1])]).SerializeToString(),
        v2.ModelInferRequest(model_name=bundle.name, parameters={"sequence_id": v2.InferParameter(int64_param=-4)},
                             inputs=[tensor(name="TOKEN_IDS", datatype="INT64", shape=[1, 1],
                                            contents=v2.InferTensorContents(int64_contents=[2]))]).SerializeToString(),
        v2.ModelInferRequest(model_name=bundle.name,
                             parameters={**sequence, "sequence_end": v2.InferParameter(string_param="yes")},
                             inputs=[tensor(name="TOKEN_IDS", datatype="INT64", shape=[1, 1],
                                            contents=v2.InferTensorContents(int64_contents=[2]))]).SerializeToString(),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{v2_server.server.v2_port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for request in malformed:
            with pytest.raises(grpc.RpcError) as caught:
                infer(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    result = triton.infer(bundle.name, [token_input(triton_grpc, [2])], sequence_id=101, sequence_end=True)
    assert_same(result, expected[1])


def test_malformed_rest_requests_are_400_with_triton_s_error_body(v2_server, bundle):
    import httpx

    base = f"http://127.0.0.1:{v2_server.server.v2_http_port}/v2/models/{bundle.name}"
    ids = {"name": "TOKEN_IDS", "datatype": "INT64", "shape": [1, 1]}
    sequence = {"sequence_id": 111, "sequence_start": True}
    malformed = [
        (b"not json", {}),
        (b'{"inputs": 3}', {}),
        (b'{"inputs": [{"name": "TOKEN_IDS"}], "parameters": {"sequence_id": 111}}', {}),
        (json.dumps({"inputs": [{**ids, "data": ["a"]}], "parameters": sequence}).encode(), {}),
        (json.dumps({"inputs": [{**ids, "parameters": {"binary_data_size": 80}}], "parameters": sequence}).encode()
         + b"\0" * 8, {"Inference-Header-Content-Length": "86"}),
        (json.dumps({"inputs": [{**ids, "data": [1]}], "parameters": sequence}).encode(),
         {"Inference-Header-Content-Length": "99999"}),
        (json.dumps({"inputs": [{**ids, "data": [1]}], "outputs": [{"name": 7}], "parameters": sequence}).encode(), {}),
    ]
    with httpx.Client() as client:
        for body, headers in malformed:
            answer = client.post(f"{base}/infer", content=body, headers=headers)
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]
        assert client.get(f"{base}/nowhere").status_code == 404
        # None of them started sequence 111: its first step without the START flag is refused as unknown.
        answer = client.post(f"{base}/infer", json={"inputs": [{**ids, "data": [1]}],
                                                   "parameters": {"sequence_id": 111}})
        assert answer.status_code == 400 and "must specify the START flag" in answer.json()["error"]
        answer = client.post(f"{base}/infer", json={"inputs": [{**ids, "data": [[1]]}],
                                                   "parameters": {**sequence, "sequence_end": True}})
        assert answer.status_code == 200 and [o["name"] for o in answer.json()["outputs"]] == [
            "TOP_IDS", "TOP_PROBABILITIES", "TOP_TEXTS"]


def test_a_limit_of_the_other_faces_names_the_input_and_the_limit(triton, bundle):
    limit = Settings().max_input_tokens
    with pytest.raises(InferenceServerException, match=f"TOKEN_IDS: .*{limit}") as caught:
        triton.infer(bundle.name, [token_input(triton_grpc, [1] * (limit + 1))], sequence_id=121,
                     sequence_start=True)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="must specify the START flag"):  # nothing was started
        triton.infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=121)


def test_rest_calls_are_counted_with_the_http_face_s(v2_server, triton_over_http, bundle):
    import urllib.request

    triton_over_http.infer(bundle.name, [token_input(triton_http, [1])], sequence_id=131, sequence_start=True,
                           sequence_end=True)
    text = urllib.request.urlopen(f"http://127.0.0.1:{v2_server.server.metrics_port}/metrics").read().decode()
    assert 'rnnserve_http_requests_total{code="200",method="ModelInfer"}' in text


def test_a_draining_server_is_not_ready_and_refuses_new_sequences(bundle):
    running = RunningServer(bundle, Settings(**V2_PORTS))
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{running.server.v2_port}")
        over_http = triton_http.InferenceServerClient(f"127.0.0.1:{running.server.v2_http_port}")
        assert client.is_server_ready() and over_http.is_server_ready()
        running.engine.drain()
        assert client.is_server_live() and over_http.is_server_live()
        assert not client.is_server_ready() and not over_http.is_server_ready()
        assert not client.is_model_ready(bundle.name)
        with pytest.raises(InferenceServerException) as caught:
            client.infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=141, sequence_start=True)
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        client.close()
        over_http.close()
    finally:
        running.stop()


def test_versions_come_from_the_repository_and_a_sequence_keeps_the_one_it_started_on(tmp_path, versions):
    from serving import repository

    running = RunningServer(None, Settings(**V2_PORTS, model_repository=repository(tmp_path, versions, "tiny/1",
                                                                                   "tiny/2", "other/1")))
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{running.server.v2_port}")
        assert client.get_model_metadata("tiny", as_json=True)["versions"] == ["1", "2"]
        assert client.is_model_ready("tiny", "1") and client.is_model_ready("tiny", "2")
        assert not client.is_model_ready("tiny", "3")
        started = client.infer("tiny", [token_input(triton_grpc, [1])], model_version="1", sequence_id=151,
                               sequence_start=True)
        assert started.get_response().model_version == "1"
        latest = client.infer("tiny", [token_input(triton_grpc, [1])], sequence_id=152, sequence_start=True)
        assert latest.get_response().model_version == "2"  # the model's default version
        step = client.infer("tiny", [token_input(triton_grpc, [2])], sequence_id=151, sequence_end=True)
        assert step.get_response().model_version == "1"
        client.close()
    finally:
        running.stop()


def test_client_certificates_own_sequences_on_both_v2_faces(tmp_path, bundle):
    import httpx

    from certificates import Authority

    authority = Authority(tmp_path, "v2-test-ca")
    server, alice, bob = authority.issue("server", server=True), authority.issue("alice"), authority.issue("bob")
    stranger = Authority(tmp_path, "another-ca").issue("stranger")
    running = RunningServer(bundle, Settings(**V2_PORTS, tls_cert=server.cert, tls_key=server.key,
                                             tls_client_ca=authority.cert))

    def over_grpc(who):
        return triton_grpc.InferenceServerClient(f"127.0.0.1:{running.server.v2_port}", ssl=True,
                                                 root_certificates=str(authority.cert), private_key=str(who.key),
                                                 certificate_chain=str(who.cert))

    def over_rest(who, tokens, **parameters):
        context = ssl.create_default_context(cafile=authority.cert)
        context.load_cert_chain(who.cert, who.key)
        with httpx.Client(verify=context) as client:
            return client.post(f"https://127.0.0.1:{running.server.v2_http_port}/v2/models/{bundle.name}/infer",
                               json={"inputs": [{"name": "TOKEN_IDS", "datatype": "INT64", "shape": [1, len(tokens)],
                                                 "data": tokens}], "parameters": {"sequence_id": 161, **parameters}})

    try:
        with pytest.raises(InferenceServerException):
            over_grpc(stranger).infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=161,
                                      sequence_start=True)
        over_grpc(alice).infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=161, sequence_start=True)
        with pytest.raises(InferenceServerException, match="START flag"):  # alice's sequence is not bob's
            over_grpc(bob).infer(bundle.name, [token_input(triton_grpc, [2])], sequence_id=161)
        refused = over_rest(bob, [2])
        assert refused.status_code == 400 and "START flag" in refused.json()["error"]
        # Alice's sequence, started over gRPC, goes on over REST: one identity, one sequence, on both faces.
        answer = over_rest(alice, [2], sequence_end=True)
        assert answer.status_code == 200 and answer.json()["parameters"]["sequence_position"] == 2
    finally:
        running.stop()


def test_a_sequence_continues_on_another_replica_through_the_session_store(tmp_path, native, bundle):
    """Its session's id is derived, not remembered by one replica: another replica sharing Redis takes the live
    sequence from its holder at its next request, and a START there for it is refused as in progress."""
    from redis_process import RedisProcess

    expected = native_predictions(native, [[1], [2], [3]])
    with RedisProcess(tmp_path) as redis_server:
        store = {"redis_url": redis_server.url, "sweep_seconds": 0.05, "redis_lease_seconds": 1.0,
                 "redis_timeout_seconds": 0.5}
        first, second = (RunningServer(bundle, Settings(**V2_PORTS, **store)) for _ in range(2))
        try:
            clients = [triton_grpc.InferenceServerClient(f"127.0.0.1:{replica.server.v2_port}")
                       for replica in (first, second)]
            assert_same(clients[0].infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=171,
                                         sequence_start=True), expected[0])
            with pytest.raises(InferenceServerException, match="in progress"):
                clients[1].infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id=171, sequence_start=True)
            assert_same(clients[1].infer(bundle.name, [token_input(triton_grpc, [2])], sequence_id=171), expected[1])
            assert_same(clients[0].infer(bundle.name, [token_input(triton_grpc, [3])], sequence_id=171,
                                         sequence_end=True), expected[2])
            for client in clients:
                client.close()
        finally:
            first.stop()
            second.stop()


@pytest.fixture(scope="module")
def fuzzed_server(bundle: Bundle) -> Iterator[RunningServer]:
    """A server of its own: sequences the fuzzing happens to start stay out of the other tests' way."""
    running = RunningServer(bundle, Settings(**V2_PORTS))
    yield running
    running.stop()


JSON_SCALARS = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8)
TENSORS = st.fixed_dictionaries(
    {"name": st.sampled_from(["TOKEN_IDS", "TEXT", "OTHER"]),
     "datatype": st.sampled_from(["INT64", "INT32", "BYTES", "FP32", "FP16", "BF16", "NOPE"]),
     "shape": st.lists(st.integers(-2, 3), max_size=3) | JSON_SCALARS},
    optional={"data": st.lists(JSON_SCALARS | st.lists(JSON_SCALARS, max_size=3), max_size=4) | JSON_SCALARS,
              "parameters": st.dictionaries(st.sampled_from(["binary_data_size"]), JSON_SCALARS)})
BODIES = st.fixed_dictionaries(
    {"inputs": st.lists(TENSORS, max_size=2) | JSON_SCALARS},
    optional={"parameters": st.dictionaries(st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "top_k",
                                                             "temperature", "initial_state"]), JSON_SCALARS),
              "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["TOP_IDS", "LOGPROBS", "X"])}),
                                  max_size=2) | JSON_SCALARS,
              "id": JSON_SCALARS})


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES)
def test_no_rest_body_is_a_server_fault(fuzzed_server, bundle, body, caplog):
    """Whatever JSON a caller posts is answered (200, or the 4xx of its mistake), never 500, and logs no fault."""
    import httpx

    url = f"http://127.0.0.1:{fuzzed_server.server.v2_http_port}/v2/models/{bundle.name}/infer"
    with caplog.at_level(logging.ERROR):
        answer = httpx.post(url, content=json.dumps(body, allow_nan=True))
    assert answer.status_code in (200, 400, 404), answer.text
    assert "error" in answer.json() or answer.status_code == 200
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


PARAMETERS = st.one_of(st.builds(lambda v: v2.InferParameter(bool_param=v), st.booleans()),
                       st.builds(lambda v: v2.InferParameter(int64_param=v), st.integers(-2 ** 63, 2 ** 63 - 1)),
                       st.builds(lambda v: v2.InferParameter(uint64_param=v), st.integers(0, 2 ** 64 - 1)),
                       st.builds(lambda v: v2.InferParameter(string_param=v), st.text(max_size=8)),
                       st.builds(lambda v: v2.InferParameter(double_param=v), st.floats()),
                       st.just(v2.InferParameter()))
GRPC_TENSORS = st.builds(
    v2.ModelInferRequest.InferInputTensor, name=st.sampled_from(["TOKEN_IDS", "TEXT", "OTHER"]),
    datatype=st.sampled_from(["INT64", "INT32", "BYTES", "FP16", "BF16", "UINT64", ""]),
    shape=st.lists(st.integers(-2, 2 ** 40), max_size=3),
    contents=st.builds(v2.InferTensorContents, int64_contents=st.lists(st.integers(-2 ** 63, 2 ** 63 - 1), max_size=3),
                       int_contents=st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), max_size=3),
                       bytes_contents=st.lists(st.binary(max_size=4), max_size=2)))
GRPC_REQUESTS = st.builds(
    lambda tensors, raw, parameters, outputs: v2.ModelInferRequest(
        model_name="tiny-lstm", inputs=tensors, raw_input_contents=raw, parameters=parameters,
        outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs]),
    st.lists(GRPC_TENSORS, max_size=2), st.lists(st.binary(max_size=16), max_size=2),
    st.dictionaries(st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "top_k", "temperature",
                                     "initial_state"]), PARAMETERS),
    st.lists(st.sampled_from(["TOP_IDS", "PROBABILITIES", "X"]), max_size=2))


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(request=GRPC_REQUESTS)
def test_no_grpc_request_is_a_server_fault(fuzzed_server, bundle, request, caplog):
    """Whatever ModelInferRequest a caller sends is answered OK or with the code of its mistake, never INTERNAL or
    UNKNOWN, and logs no fault."""
    assert bundle.name == "tiny-lstm"
    with caplog.at_level(logging.ERROR), grpc.insecure_channel(
            f"127.0.0.1:{fuzzed_server.server.v2_port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            infer(request.SerializeToString())
        except grpc.RpcError as error:
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), error.details()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_a_sequence_survives_a_restart_with_a_snapshot(tmp_path, native, bundle):
    expected = native_predictions(native, [[1], [2]])
    settings = Settings(**V2_PORTS, snapshot_path=str(tmp_path / "snapshot"))
    running = RunningServer(bundle, settings)
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{running.server.v2_port}")
    assert_same(client.infer(bundle.name, [token_input(triton_grpc, [1])], sequence_id="kept", sequence_start=True),
                expected[0])
    client.close()
    running.stop()
    running = RunningServer(bundle, settings)
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{running.server.v2_port}")
        assert_same(client.infer(bundle.name, [token_input(triton_grpc, [2])], sequence_id="kept", sequence_end=True),
                    expected[1])
        client.close()
    finally:
        running.stop()
