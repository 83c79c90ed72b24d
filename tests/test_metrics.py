"""The metrics module on its own: what each record call adds, served over HTTP, and promtool's lint."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from rnnserve.server.core.batcher import BatchReport
from rnnserve.server.metrics import Metrics, MetricsEndpoint, batch_size_buckets
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import create

PROMTOOL = shutil.which("promtool")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def samples(exposition: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, keyed by name and labels."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(exposition) for sample in family.samples}


def promtool_check(exposition: str) -> None:
    """`promtool check metrics`: the exposition parses and follows Prometheus's naming conventions."""
    if PROMTOOL is None:
        pytest.skip("promtool is missing: install Debian's prometheus package (make system-packages)")
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture
def served(bundle):
    """Metrics for the tiny bundle in a registry of their own, served on an ephemeral loopback port."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_batch_size=64, max_sessions=50)
    endpoint = MetricsEndpoint(registry, "127.0.0.1:0")
    yield metrics, f"http://127.0.0.1:{endpoint.port}/metrics"
    endpoint.close()


def test_a_batch_is_recorded_once_whatever_its_size(served, bundle):
    metrics, url = served
    model = {("model", bundle.name), ("model_version", bundle.version)}
    version = metrics.model(bundle)
    version.record_batch(BatchReport(steps=8, tokens=8, queue_wait_seconds=2e-5, run_seconds=3e-4,
                                     compute_seconds=4e-4, applied=7))
    version.record_batch(BatchReport(steps=2, tokens=10, queue_wait_seconds=1e-3, run_seconds=2e-3,
                                     compute_seconds=3e-3, applied=2))
    version.record_batch(BatchReport(steps=1, tokens=1, queue_wait_seconds=0.0, run_seconds=0.0,
                                     compute_seconds=1e-3, applied=0, failed=True))
    found = samples(scrape(url))
    assert found["rnnserve_tokens_total", frozenset(model | {("kind", "step")})] == 7  # the applied steps only
    assert found["rnnserve_tokens_total", frozenset(model | {("kind", "prefill")})] == 10
    assert found["rnnserve_batch_size_steps_count", frozenset(model)] == 3
    assert found["rnnserve_batch_size_steps_sum", frozenset(model)] == 11
    assert found["rnnserve_onnxruntime_run_seconds_count", frozenset(model)] == 2  # not the failed call
    assert found["rnnserve_model_call_failures_total", frozenset(model)] == 1
    assert found["rnnserve_queue_wait_seconds_bucket", frozenset(model | {("le", "2.5e-05")})] == 2


def test_sessions_rpcs_and_info(served, bundle):
    metrics, url = served
    model = {("model", bundle.name), ("model_version", bundle.version)}
    held = [3]
    version = metrics.model(bundle)
    version.watch_sessions(lambda: held[0], row_bytes=1000)
    version.record_session_created()
    version.record_session_restored()
    version.record_session_restored()
    version.record_session_ended("evicted", tokens=17, age_seconds=30.0)
    version.record_capacity_refusal()
    metrics.record_rpc("Step", grpc.StatusCode.NOT_FOUND.value[0], 1e-4)
    metrics.record_in_band_error(grpc.StatusCode.FAILED_PRECONDITION.value[0])
    version.record_first_prediction(5e-3)
    held[0] = 4  # read when scraped, not when it changed
    found = samples(scrape(url))
    assert found["rnnserve_sessions_active", frozenset(model)] == 4
    assert found["rnnserve_session_state_bytes", frozenset(model)] == 4000
    assert found["rnnserve_sessions_limit", frozenset()] == 50  # one budget, all models together
    assert found["rnnserve_sessions_created_total", frozenset(model)] == 1
    assert found["rnnserve_sessions_restored_total", frozenset(model)] == 2
    assert found["rnnserve_sessions_ended_total", frozenset(model | {("reason", "evicted")})] == 1
    assert found["rnnserve_sessions_ended_total", frozenset(model | {("reason", "closed")})] == 0
    assert found["rnnserve_session_length_tokens_sum", frozenset(model)] == 17
    assert found["rnnserve_capacity_refusals_total", frozenset(model)] == 1
    assert found["rnnserve_rpcs_total", frozenset({("method", "Step"), ("code", "NOT_FOUND")})] == 1
    assert found["rnnserve_in_band_errors_total", frozenset({("code", "FAILED_PRECONDITION")})] == 1
    assert found["rnnserve_time_to_first_prediction_seconds_count", frozenset(model)] == 1
    info = {dict(labels)["cell"] for name, labels in found if name == "rnnserve_model_info"}
    assert info == {"lstm"}
    assert any(name == "rnnserve_build_info" for name, _ in found)


def test_a_live_servers_metrics_have_one_prefix_and_pass_promtool(shared_server, stub):
    session_id = create(stub, prompt_text="the quick")
    stub.Step(pb.StepRequest(session_id=session_id, text=" brown"))
    with pytest.raises(grpc.RpcError):
        stub.GetSession(pb.GetSessionRequest(session_id="no-such-session"))
    exposition = scrape(f"http://127.0.0.1:{shared_server.server.metrics_port}/metrics")
    assert {family.name.split("_")[0] for family in text_string_to_metric_families(exposition)} == {"rnnserve"}
    assert 'rnnserve_rpcs_total{code="NOT_FOUND",method="GetSession"}' in exposition
    promtool_check(exposition)


def test_batch_size_buckets_end_at_the_maximum_batch():
    assert batch_size_buckets(1) == (1.0,)
    assert batch_size_buckets(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert batch_size_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)


def test_without_a_metrics_address_nothing_is_recorded_or_served(start_server):
    running = start_server(metrics_listen="")
    assert running.server.metrics_port is None
    assert running.engine.metrics is None and running.model.batcher.on_batch is None


def test_the_prefix_state_cache_reports_hits_misses_reused_tokens_and_size(start_server):
    running = start_server(prefix_cache_min_tokens=4)
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        prompt = list(range(1, 11))
        create(stub, prompt_token_ids=prompt)  # a miss, then cached
        create(stub, prompt_token_ids=prompt)  # a hit: 10 tokens reused
        create(stub, prompt_token_ids=prompt + [3, 4])  # a hit on the prefix: 10 more
        create(stub, prompt_token_ids=[1, 2])  # too short to be cached or to count as a miss
    found = samples(scrape(f"http://127.0.0.1:{running.server.metrics_port}/metrics"))
    model = frozenset({("model", running.model.name), ("model_version", running.model.version)})
    assert found["rnnserve_prefix_cache_hits_total", model] == 2
    assert found["rnnserve_prefix_cache_misses_total", model] == 1
    assert found["rnnserve_prefix_cache_reused_tokens_total", model] == 20
    assert found["rnnserve_prefix_cache_entries", model] == 2  # the prompt, and the prompt with its suffix
    assert found["rnnserve_prefix_cache_bytes", model] == 2 * running.model.pool.row_bytes + 8 * (10 + 12)
