"""What only the HTTP face has: status codes and headers, server-sent events, probes, its metrics,
TLS and client certificates over HTTPS, and its flag."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from certificates import Authority
from faces import Failed, GrpcFace, HttpFace, read_events
from rnnserve.server.faces.web.face import bind
from rnnserve.server.faces.web.routes import ROUTES
from rnnserve.server.settings import parse_settings
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import slow_model

pytestmark = pytest.mark.every_model

HTTP = {"http_listen": "127.0.0.1:0"}


def client(running, **options) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{running.server.http_port}", timeout=30, **options)


def session(http: httpx.Client, prompt: str = "The") -> str:
    return http.post("/v1/sessions", json={"prompt_text": prompt}).json()["session"]["session_id"]


def test_generate_as_events_equals_generate_as_an_array(start_server):
    running = start_server(**HTTP)
    with client(running) as http:
        request = {"max_tokens": 20, "temperature": 1.0, "seed": 5, "stop": ["e "]}
        array = http.post(f"/v1/sessions/{session(http)}/generate", json=request)
        events = http.post(f"/v1/sessions/{session(http)}/generate", json=request,
                           headers={"accept": "text/event-stream"})
        assert array.headers["content-type"] == "application/json"
        assert events.headers["content-type"].startswith("text/event-stream")
        assert read_events(events.text) == array.json() and array.json()
        assert array.json()[-1]["finish_reason"] != "FINISH_REASON_UNSPECIFIED"


def test_a_stream_that_fails_before_its_first_event_answers_its_http_status(start_server):
    running = start_server(**HTTP)
    with client(running) as http:
        answer = http.post("/v1/sessions/feedbeef/generate?stream=true", json={"max_tokens": 3})
        assert answer.status_code == 404 and answer.json()["error"]["status"] == "NOT_FOUND"


def test_http_codes_and_headers(start_server):
    running = start_server(**HTTP, max_sessions=1, max_message_bytes=1000)
    with client(running) as http:
        first = session(http)
        full = http.post("/v1/sessions", json={})
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["details"][0]["reason"] == "CAPACITY_EXHAUSTED"
        mismatch = http.post(f"/v1/sessions/{first}/step", json={"text": "a", "expected_position": 9})
        assert mismatch.status_code == 400 and mismatch.json()["error"]["status"] == "FAILED_PRECONDITION"
        conflict = http.post(f"/v1/sessions/{first}/step", json={"session_id": "other", "text": "a"})
        assert conflict.status_code == 400 and "session_id" in conflict.json()["error"]["message"]
        for body in (b"[1, 2]", b"not json", b'{"text": 5}', b'{"unknown_field": 1}'):
            answer = http.post(f"/v1/sessions/{first}/step", content=body)
            assert answer.status_code == 400, body
            assert answer.json()["error"]["details"][1]["field_violations"][0]["field"] == "request"
        too_large = http.post(f"/v1/sessions/{first}/step", json={"text": "a" * 1000})
        assert too_large.status_code == 400 and "--max-message-bytes" in too_large.json()["error"]["message"]
        wrong_verb, no_route = http.get("/v1/sessions"), http.get("/v2/nothing")
        assert (wrong_verb.status_code, wrong_verb.json()["error"]["status"]) == (405, "UNIMPLEMENTED")
        assert wrong_verb.headers["allow"] == "POST"
        assert (no_route.status_code, no_route.json()["error"]["status"]) == (404, "NOT_FOUND")
        assert http.get(f"/v1/sessions/{first}").json()["position"] == "3"  # no mistake changed it


def test_probes_say_live_and_ready_and_not_ready_while_draining(start_server):
    running = start_server(**HTTP)
    with client(running) as http:
        assert http.get("/healthz").json() == {"status": "SERVING"}
        assert http.get("/readyz").json() == {"status": "SERVING"}
        running.run(running.server.health.set(pb.DESCRIPTOR.services_by_name["Inference"].full_name,
                                              health_pb2.HealthCheckResponse.NOT_SERVING))
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "NOT_SERVING"}
        assert http.get("/healthz").status_code == 200


def test_http_requests_are_counted_by_method_and_http_code(start_server):
    running = start_server(**HTTP)
    with client(running) as http:
        session(http)
        http.get("/v1/sessions/nope")
        http.get("/v1/sessions/nope")
        metrics = httpx.get(f"http://127.0.0.1:{running.server.metrics_port}/metrics").text
    assert 'rnnserve_http_requests_total{code="200",method="CreateSession"} 1.0' in metrics
    assert 'rnnserve_http_requests_total{code="404",method="GetSession"} 2.0' in metrics
    assert 'rnnserve_http_request_duration_seconds_count{method="GetSession"} 2.0' in metrics


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    authority = Authority(folder, "rnnserve-test-ca")
    return authority.cert, authority.issue("server", server=True), authority.issue("alice"), authority.issue("bob")


def test_https_with_client_certificates_owns_sessions_as_grpc_does(start_server, pki):
    ca, server, alice, bob = pki
    running = start_server(**HTTP, tls_cert=server.cert, tls_key=server.key, tls_client_ca=ca)
    base = f"https://127.0.0.1:{running.server.http_port}"

    def https(who):
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(who.cert, who.key)
        return httpx.Client(base_url=base, verify=context, timeout=30)

    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), alice.key.read_bytes(), alice.cert.read_bytes())
    with https(alice) as as_alice, https(bob) as as_bob, \
            grpc.secure_channel(running.address, credentials) as channel:
        created = session(as_alice)
        stub = rnnserve_pb2_grpc.InferenceStub(channel)  # alice over gRPC owns what alice made over HTTPS
        assert stub.Step(pb.StepRequest(session_id=created, text=" q")).position == 5
        assert as_bob.get(f"/v1/sessions/{created}").status_code == 404
        assert as_alice.get(f"/v1/sessions/{created}").json()["position"] == "5"
    with pytest.raises(httpx.HTTPError):  # no client certificate: refused at the handshake
        httpx.get(f"{base}/healthz", verify=ssl.create_default_context(cafile=ca))


def test_the_flag_has_an_environment_twin_and_a_busy_port_stops_the_start():
    assert parse_settings([], {"RNNSERVE_HTTP_LISTEN": "127.0.0.1:8080"}).http_listen == "127.0.0.1:8080"
    assert parse_settings(["--http-listen", "0.0.0.0:9"], {}).http_listen == "0.0.0.0:9"
    assert parse_settings([], {}).http_listen == ""
    taken = bind("127.0.0.1:0")
    with pytest.raises(OSError, match="cannot listen for HTTP"):
        bind(f"127.0.0.1:{taken.getsockname()[1]}")
    taken.close()


def test_a_session_closed_over_http_is_closed_to_grpc(start_server):
    running = start_server(**HTTP)
    grpc_face, http_face = GrpcFace(running.address), HttpFace(f"http://127.0.0.1:{running.server.http_port}")
    created = grpc_face.call("CreateSession", {"prompt_text": "ab"})["session"]["session_id"]
    assert http_face.call("CloseSession", {"session_id": created}) == {"position": "2"}
    with pytest.raises(Failed) as closed:
        grpc_face.call("GetSession", {"session_id": created})
    assert closed.value.status == "NOT_FOUND" and "was closed" in closed.value.message
    grpc_face.close(), http_face.close()


def test_the_readme_lists_every_route():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [f"{route.verb} {route.path}" for route in ROUTES if f"`{route.verb} {route.path}`" not in readme]
    assert missing == []


def test_a_reader_that_goes_away_cancels_the_generate(start_server):
    running = start_server(**HTTP)
    slow_model(running, 0.01)  # each token takes a while, so the generate is still running when the reader leaves
    with client(running) as http:
        created = session(http)
        tasks = running.task_count()
        with http.stream("POST", f"/v1/sessions/{created}/generate?stream=true", json={"max_tokens": 500}) as events:
            first = next(events.iter_lines())
        assert first.startswith("data: ")
        deadline = time.monotonic() + 10
        while running.task_count() > tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.task_count() <= tasks  # the call's tasks ended with the connection
        position = int(http.get(f"/v1/sessions/{created}").json()["position"])
        assert len("The") < position < len("The") + 500  # stopped early, and the session still answers
        assert http.post(f"/v1/sessions/{created}/step", json={"text": "a"}).json()["position"] == str(position + 1)


def test_a_deadline_in_x_server_timeout_is_the_calls_deadline_as_over_grpc(start_server):
    running = start_server(**HTTP)
    with client(running) as http:
        created = session(http)
        slow_model(running, 0.3)
        late = http.post(f"/v1/sessions/{created}/step", json={"text": "ab"}, headers={"x-server-timeout": "0.05"})
        with pytest.raises(Failed) as over_grpc:
            GrpcFace(running.address).call("Step", {"session_id": created, "text": "ab"}, timeout=0.05)
        assert (late.status_code, late.json()["error"]["status"]) == (504, over_grpc.value.status) == \
            (504, "DEADLINE_EXCEEDED")
        time.sleep(0.7)  # what was queued has run, or been dropped, by now
        assert http.get(f"/v1/sessions/{created}").json()["position"] == "3"  # neither late step was applied
        assert http.post(f"/v1/sessions/{created}/step", json={"text": "c"}, headers={"x-server-timeout": "5"}).is_success
        bad = http.post(f"/v1/sessions/{created}/step", json={"text": "c"}, headers={"x-server-timeout": "soon"})
        assert bad.status_code == 400 and "x-server-timeout" in bad.json()["error"]["message"]
