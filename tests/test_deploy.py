"""The compose stack without Docker: the file validates, its pieces agree, and its commands run here.

No Docker engine runs in CI, so `docker-compose config` checks the file, promtool checks the
Prometheus configuration, and what the containers would run (the server's command line and
its health check) is run outside containers against a live server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "rnnserve.json"
REPLICAS_PROFILE = {"redis", "replica1", "replica2", "replica3", "haproxy"}


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is missing: install Debian's {package} package (make system-packages)")
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as docker-compose itself resolves it (paths made absolute, defaults filled in)."""
    resolved = subprocess.run([tool("docker-compose", "docker-compose"), "config"], cwd=ROOT, capture_output=True,
                              text=True)
    assert resolved.returncode == 0, resolved.stderr
    return yaml.safe_load(resolved.stdout)


def dockerfile_env(name: str) -> str:
    """An `ENV NAME=value` default of the serving image."""
    return re.search(rf"\b{name}=(\S+)", (ROOT / "Dockerfile").read_text()).group(1)


def port_of(address: str) -> str:
    return address.rsplit(":", 1)[1]


def installed(command: str) -> str:
    """A console script of this environment, as the image installs it on its PATH."""
    return str(Path(sys.executable).with_name(command))


def test_every_service_has_a_health_check(compose):
    assert set(compose["services"]) == {"rnnserve", "prometheus", "grafana", *REPLICAS_PROFILE}
    for name, service in compose["services"].items():
        assert service["healthcheck"]["test"][0] == "CMD", name


def test_rnnserve_is_built_from_the_dockerfile_with_the_serving_lock_alone(compose):
    assert Path(compose["services"]["rnnserve"]["build"]["context"]) == ROOT
    installs = re.findall(r"pip install (.+)", (ROOT / "Dockerfile").read_text())
    # The serving lock with its hashes (no torch in it: tests/test_lock.py), then rnnserve with nothing more.
    assert installs == ["--require-hashes --no-deps -r requirements/serving.lock",
                        "--no-deps --no-build-isolation . && rm -rf /src"]
    assert "!requirements/serving.lock" in (ROOT / ".dockerignore").read_text().splitlines()


def test_the_replicas_profile_puts_three_replicas_behind_the_proxy_it_tests(compose):
    """The proxy runs the haproxy.cfg that tests/test_replicas.py runs, routing to the replicas by name."""
    services = compose["services"]
    assert {name for name, service in services.items() if service.get("profiles") == ["replicas"]} == REPLICAS_PROFILE
    config = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    (mount,) = services["haproxy"]["volumes"]
    assert Path(mount.split(":")[0]) == DEPLOY / "haproxy" / "haproxy.cfg"
    for port in (port_of(dockerfile_env("RNNSERVE_LISTEN")), port_of(dockerfile_env("RNNSERVE_HTTP_LISTEN"))):
        assert re.findall(rf"server (replica\d) (\S+:{port})\n", config) == [
            (name, f"{name}:{port}") for name in ("replica1", "replica2", "replica3")]
    for name in ("replica1", "replica2", "replica3"):
        environment = services[name]["environment"]
        assert environment["RNNSERVE_REPLICA_ID"] == name
        assert environment["RNNSERVE_REDIS_URL"].startswith("redis://redis:")
    checked = subprocess.run([tool("haproxy", "haproxy"), "-c", "-f", DEPLOY / "haproxy" / "haproxy.cfg"],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_replicas_redis_keeps_sessions_on_a_volume(compose):
    """Append-only, fsynced every second or more often, in /data on a named volume: a restart keeps what it had."""
    redis = compose["services"]["redis"]
    flags = dict(zip(redis["command"][1::2], redis["command"][2::2]))
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] in ("everysec", "always")
    assert any(volume.split(":")[:2] == ["redis-data", "/data"] for volume in redis["volumes"])
    assert "redis-data" in compose["volumes"]


def test_mounted_files_exist(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts missing {source}"


def test_prometheus_scrapes_the_port_the_image_serves_metrics_on(compose):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"]
    assert port == port_of(dockerfile_env("RNNSERVE_METRICS_LISTEN"))
    promtool = tool("promtool", "prometheus")
    checked = subprocess.run([promtool, "check", "config", DEPLOY / "prometheus" / "prometheus.yml"],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_rnnserve_health_check_and_published_ports_match_the_grpc_and_http_ports(compose):
    service = compose["services"]["rnnserve"]
    grpc_port, http_port = port_of(dockerfile_env("RNNSERVE_LISTEN")), port_of(dockerfile_env("RNNSERVE_HTTP_LISTEN"))
    address = service["healthcheck"]["test"][service["healthcheck"]["test"].index("--address") + 1]
    assert port_of(address) == grpc_port
    assert [p.split(":")[-1].split("/")[0] for p in service["ports"]] == [grpc_port, http_port]


def test_grafana_provisions_the_datasource_and_dashboard_the_compose_file_mounts(compose):
    mounts = dict(volume.split(":")[1::-1] for volume in compose["services"]["grafana"]["volumes"])
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/rnnserve.yml").read_text())
    (provider,) = providers["providers"]
    assert Path(mounts[provider["options"]["path"]]) == DASHBOARD.parent
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Tokens per second", "Step latency", "Active sessions", "Batch size", "Queue wait",
            "Errors by code"} <= titles


def test_the_rnnserve_container_command_and_health_check_run_here(compose):
    """The compose command with its environment, the image's addresses moved to loopback ports, then the
    health check against it: JSON log lines, one per event, none per step; metrics served; no torch loaded."""
    service = compose["services"]["rnnserve"]
    environ = {**os.environ, **service.get("environment", {}),
               "RNNSERVE_LISTEN": "127.0.0.1:0", "RNNSERVE_METRICS_LISTEN": "127.0.0.1:0"}
    executable, *flags = service["command"]
    process = subprocess.Popen([installed(executable), *flags], env=environ, stderr=subprocess.PIPE, text=True)
    try:
        served = [json.loads(process.stderr.readline()) for _ in range(2)]
        grpc_port, metrics_port = (int(re.search(r"port (\d+)", event["message"]).group(1)) for event in served)
        address = f"127.0.0.1:{grpc_port}"

        check = service["healthcheck"]["test"][1:]
        check[check.index("--address") + 1] = address
        assert subprocess.run([installed(check[0]), *check[1:]], capture_output=True).returncode == 0

        with grpc.insecure_channel(address) as channel:
            stub = rnnserve_pb2_grpc.InferenceStub(channel)
            session_id = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            for character in "To be, or not to be":
                stub.Step(pb.StepRequest(session_id=session_id, text=character))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert 'rnnserve_tokens_total{kind="step"' in response.read().decode()
        assert "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text()

        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        events = [json.loads(line) for line in process.stderr.read().splitlines()]
        assert [event["message"] for event in events][-1] == "stopped"
        assert len(events) <= 3, events  # shutting down, stopped: nothing for the steps
    finally:
        process.kill()
