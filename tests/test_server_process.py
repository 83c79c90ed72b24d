"""The server as deployed: stock health and reflection, the `rnnserve-server` command, and no torch."""

import json
import os
import re
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rnnserve.server.app import SERVICE_NAME
from rnnserve.server.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS


def test_health_reports_serving_for_the_server_and_the_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_services(channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)]
    listed, described = reflection.ServerReflectionInfo(iter(requests))
    services = {service.name for service in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert described.file_descriptor_response.file_descriptor_proto  # generic tools can build requests from it


def test_the_serving_path_never_imports_torch():
    code = ("import sys, json; import rnnserve.server.main, rnnserve.server.app; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('rnnserve.export'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


def test_uvloop_is_the_default_event_loop_where_it_is_installed():
    assert DEFAULT_EVENT_LOOP == "uvloop" and "asyncio" in EVENT_LOOPS  # uvloop is a dependency on Linux


@pytest.mark.parametrize(("event_loop", "switch_flags", "switch_us"), [("uvloop", [], 5000),
                                                                      ("asyncio", ["--gil-switch-interval-us", "250"], 250)])
def test_the_command_serves_until_sigterm_then_stops_cleanly(bundle, event_loop, switch_flags, switch_us):
    environ = {**os.environ, "RNNSERVE_BUNDLE": str(bundle.path), "RNNSERVE_EVENT_LOOP": event_loop}
    process = subprocess.Popen([sys.executable, "-m", "rnnserve.server.main", "--listen", "127.0.0.1:0",
                                *switch_flags], env=environ, stderr=subprocess.PIPE, text=True)
    try:
        started = process.stderr.readline()
        assert f"event loop {event_loop}" in started  # the loop it runs on, not just the one it was asked for
        assert f"GIL switch interval {switch_us} us" in started  # read back from the running interpreter
        port = int(re.search(r"port (\d+)", started).group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert "stopped" in process.stderr.read()
    finally:
        process.kill()
