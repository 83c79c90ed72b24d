"""A replica for tests: `rnnserve-server` as a process of its own on a loopback port, sharing sessions through Redis.

A process of its own, so that SIGTERM drains it as in production and SIGKILL gives it no chance
to hand anything over.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.bundle import Bundle
from serving import free_port


class Replica:
    """`rnnserve-server --redis-url ... --replica-id <name>` with `flags` besides; `http` also serves HTTP/JSON."""

    def __init__(self, bundle: Bundle, redis_url: str, name: str, workdir: Path, flags: list[str],
                 http: bool = False):
        self.name = name
        self.address = f"127.0.0.1:{free_port()}"
        self.http_address = f"127.0.0.1:{free_port()}" if http else None
        command = ["--listen", self.address, "--redis-url", redis_url, "--replica-id", name, "--event-loop", "asyncio",
                   *(["--http-listen", self.http_address] if http else []), *flags]
        self.log = workdir / f"{name}.log"
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen([sys.executable, "-m", "rnnserve.server.main", *command],
                                            env={**os.environ, "RNNSERVE_BUNDLE": str(bundle.path)},
                                            stdout=sink, stderr=subprocess.STDOUT)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            while True:
                try:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    return
                except grpc.RpcError:
                    assert time.monotonic() < deadline and self.process.poll() is None, self.log.read_text()[-3000:]
                    time.sleep(0.1)

    def stop(self) -> None:
        """Kill it outright (kill -9), if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
