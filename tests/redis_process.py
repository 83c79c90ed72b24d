"""A real Redis for tests: Debian's redis-server on a loopback port, nothing written to disk unless asked.

`stop` (SIGKILL) and `start` again on the same port let a test take Redis away mid-run and bring it
back: empty, or, with `appendonly`, with what its append-only file kept (appendfsync everysec, as
docker-compose.yml runs it).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis
from serving import free_port

BINARY = shutil.which("redis-server") or "/usr/bin/redis-server"
STARTUP_SECONDS = 10.0


class RedisProcess:
    """`with RedisProcess(workdir) as redis:` serves redis://127.0.0.1:<port>/0 until the block ends."""

    def __init__(self, workdir: Path, appendonly: bool = False, flags: tuple[str, ...] = ()):
        self.workdir = workdir
        self.persistence = (["--appendonly", "yes", "--appendfsync", "everysec"] if appendonly
                            else ["--appendonly", "no"])
        self.flags = flags  # more of redis-server's, e.g. ("--rename-command", "CONFIG", "")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = self.workdir / "redis.log"
        with self.log.open("ab") as sink:
            self._process = subprocess.Popen(
                [BINARY, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *self.persistence,
                 "--dir", str(self.workdir), *self.flags], stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start; its log:\n{self.log.read_text()[-3000:]}")

    def flush(self) -> None:
        """Empty it, for the next stage of a run."""
        with redis.Redis.from_url(self.url) as client:
            client.flushall()

    def used_memory(self) -> int:
        """Bytes Redis holds (INFO memory used_memory)."""
        with redis.Redis.from_url(self.url) as client:
            return int(client.info("memory")["used_memory"])

    def pause(self) -> None:
        """Stop it answering (SIGSTOP), its data kept: a partition or a stall, not a restart."""
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill it outright: its data goes with it, as with a crashed Redis without persistence."""
        self._process.kill()
        self._process.wait(10)

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._process.poll() is None:
            self.stop()
