"""A real HAProxy for tests: Debian's binary in the foreground, running deploy/haproxy/haproxy.cfg.

The shipped file is exercised as it is, only listening on a loopback port and with its server
lines pointed at the test's replicas (and no compose DNS to resolve them).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from serving import end_process, free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
BINARY = shutil.which("haproxy") or "/usr/sbin/haproxy"
STARTUP_SECONDS = 10.0


def proxy_config(listen: str, replicas: list[str], http_listen: str, http_replicas: list[str]) -> str:
    """deploy/haproxy/haproxy.cfg listening on `listen` (gRPC) and `http_listen` (HTTP/JSON), routing to
    `replicas` and `http_replicas` (host:port each)."""
    config = DEPLOY_CONFIG.read_text()
    config = re.sub(r"\n    bind :50051 ", f"\n    bind {listen} ", config)
    config = re.sub(r"\n    bind :8080\n", f"\n    bind {http_listen}\n", config)
    config = re.sub(r"\nresolvers compose\n(    .*\n)+", "\n", config)
    config = config.replace(" resolvers compose", "")
    for port, addresses in ((50051, replicas), (8080, http_replicas)):
        servers = "".join(f"    server replica{i} {address}\n" for i, address in enumerate(addresses, 1))
        config, count = re.subn(rf"(    server replica\d+ replica\d+:{port}\n)+", servers, config)
        assert count == 1, "the shipped configuration's server lines have moved"
    return config


class HAProxyProcess:
    """`with HAProxyProcess(workdir, replicas) as proxy:` routes `proxy.address` to the replicas until the block ends,
    and `proxy.http_address` to `http_replicas` (to `replicas` when not given: a proxy used for gRPC alone)."""

    def __init__(self, workdir: Path, replicas: list[str], http_replicas: list[str] | None = None):
        self.workdir = workdir
        self.address = f"127.0.0.1:{free_port()}"
        self.http_address = f"127.0.0.1:{free_port()}"
        self.config = proxy_config(self.address, replicas, self.http_address, http_replicas or replicas)
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> HAProxyProcess:
        path = self.workdir / "haproxy.cfg"
        path.write_text(self.config)
        self.log = self.workdir / "haproxy.log"
        with self.log.open("wb") as sink:
            self._process = subprocess.Popen([BINARY, "-db", "-f", str(path)], stdout=sink, stderr=subprocess.STDOUT)
        host, _, port = self.address.rpartition(":")
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"haproxy did not start; its log:\n{self.log.read_text()[-3000:]}")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        end_process(self._process)
