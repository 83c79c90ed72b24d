"""A real Prometheus scrapes a live rnnserve: PromQL over what it scraped matches the traffic sent.

The traffic is small and counted exactly (tokens by kind, sessions, refusals, errors by code),
so the checks are equalities; the token rate is read at the last scrape's instant, where
Prometheus's extrapolation adds nothing, so rate x window is the token count itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_process import BINARY, PrometheusProcess

from rnnserve.client import CapacityExhausted, Client, SessionNotFound

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "rnnserve.json"
PROMPT = "the quick brown fox"  # a prefill of len(PROMPT) tokens: the tiny vocabulary has one per character
UNARY_STEPS = "jumps over"
STREAM_STEPS = "the lazy dog"
GENERATE_PREFIX, GENERATED = "; ", 5
RATE_WINDOW_SECONDS = 300  # longer than the test: the window holds every sample, the first taken before any traffic

pytestmark = pytest.mark.skipif(shutil.which(BINARY) is None, reason="the prometheus binary is missing: install "
                                "Debian's prometheus package (make system-packages)")


def value(prometheus: PrometheusProcess, expr: str, **params: object) -> float:
    (found,) = prometheus.query(expr, **params).values()
    return found


def drive(client: Client) -> None:
    """Four sessions (the cap), one refused, one closed and looked up, steps over Step (a `unary` client), Stream
    and Generate."""
    prompted = client.session(PROMPT)
    unary, streamed, closed = client.session(), client.session(), client.session()
    with pytest.raises(CapacityExhausted):
        client.session()
    closed.close()
    with pytest.raises(SessionNotFound):
        client.resume(closed.id)
    for character in UNARY_STEPS:
        unary.step(character)
    with client.stream() as stream:
        for character in STREAM_STEPS:
            stream.step(streamed, character)
        with pytest.raises(SessionNotFound):
            stream.step(closed.id, "x")  # answered in-band: the stream goes on
    assert len(list(prompted.generate(GENERATED, tokens=GENERATE_PREFIX))) == GENERATED


def test_prometheus_reads_tokens_sessions_and_errors_from_a_live_server(start_server, tmp_path):
    server = start_server(max_sessions=4, when_full="refuse")
    target = f"127.0.0.1:{server.server.metrics_port}"
    with PrometheusProcess(tmp_path, target) as prometheus, Client(server.address, timeout=10, unary=True) as client:
        assert prometheus.wait_for('rnnserve_tokens_total{kind="step"}'), "no scrape before the traffic"
        drive(client)
        steps = len(UNARY_STEPS) + len(STREAM_STEPS) + GENERATED
        scraped = prometheus.wait_for(f'sum(rnnserve_tokens_total{{kind="step"}}) == {steps}')
        assert scraped, prometheus.query("rnnserve_tokens_total")

        assert value(prometheus, 'sum(rnnserve_tokens_total{kind="prefill"})') == len(PROMPT) + len(GENERATE_PREFIX)
        last_scrape = value(prometheus, 'max(timestamp(rnnserve_tokens_total{kind="step"}))')
        rate = value(prometheus, f'sum(rate(rnnserve_tokens_total{{kind="step"}}[{RATE_WINDOW_SECONDS}s]))',
                     time=last_scrape)
        assert rate * RATE_WINDOW_SECONDS == pytest.approx(steps)
        assert value(prometheus, "sum(rnnserve_sessions_active)") == 3
        assert value(prometheus, "sum(rnnserve_sessions_created_total)") == 4
        assert value(prometheus, 'sum(rnnserve_sessions_ended_total{reason="closed"})') == 1
        assert value(prometheus, "sum(rnnserve_capacity_refusals_total)") == 1
        assert value(prometheus, 'rnnserve_rpcs_total{method="GetSession", code="NOT_FOUND"}') == 1
        assert value(prometheus, 'rnnserve_rpcs_total{method="CreateSession", code="RESOURCE_EXHAUSTED"}') == 1
        assert value(prometheus, 'rnnserve_rpcs_total{method="Step", code="OK"}') == len(UNARY_STEPS)
        assert value(prometheus, 'sum(rnnserve_in_band_errors_total{code="NOT_FOUND"})') == 1
        assert value(prometheus, "sum(rnnserve_time_to_first_prediction_seconds_count)") == 2

        check_dashboard_queries(prometheus)
        picture = tmp_path / "dashboard.png"
        subprocess.run([sys.executable, ROOT / "deploy" / "render_dashboard.py", "--prometheus", prometheus.url,
                        "--minutes", "1", "--rate-window", "10s", "--out", picture], check=True, capture_output=True)
        assert picture.read_bytes().startswith(b"\x89PNG")


def check_dashboard_queries(prometheus: PrometheusProcess) -> None:
    """Every query of every Grafana panel is valid PromQL with data behind it.

    A series born with the traffic (an error code's) needs a second scrape before rate() sees it.
    """
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        exprs = [target["expr"].replace("$__rate_interval", "1m") for target in panel["targets"]]
        assert prometheus.wait_for(" or ".join(f"({expr})" for expr in exprs)), f"panel {panel['title']!r} shows nothing"
