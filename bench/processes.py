"""Servers under test run as child processes: started, found on their port, measured, stopped.

A separate process keeps the server's event loop, threads and memory apart from the load
generator's, as in production, and lets W5 read the server's resident memory alone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

# rnnserve-server logs the address it was given and the port it bound ("... on 127.0.0.1:0,
# port 41235"); the echo server announces itself the same way.
ADDRESS_LINE = re.compile(r" on ([^\s,:]+):\d+, port (\d+)")
STARTUP_SECONDS = 60.0
STOP_SECONDS = 15.0
_CPUCLOCK_SCHED = 2  # Linux's per-process CPU clock that counts scheduled time in nanoseconds


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used, all its threads together, exited ones included.

    Read from the kernel's CPU clock of that process (clock_gettime on its clock id, as
    `clock_getcpuclockid` makes it), in nanoseconds: /proc/<pid>/stat counts in clock ticks of
    10 ms, which are coarser than a short loop's whole CPU time (20 echo messages at 200 us read 0).
    """
    try:
        return time.clock_gettime(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError:  # a kernel without per-process CPU clocks: the ticks
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


class ServerProcess:
    """`with ServerProcess(argv, log) as server:` runs `argv` until the block ends.

    Its output goes to `log` (kept for a failed run's post-mortem, and never a full pipe that
    could stall the server); `address` is what the server announced there.
    """

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.argv = argv
        self.log = log
        self.env = env
        self.address = ""
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as sink:
            self._process = subprocess.Popen(self.argv, stdout=sink, stderr=subprocess.STDOUT,
                                             env={**os.environ, **(self.env or {})})
        self.address = self._wait_for_address()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def announced_port(self, line: re.Pattern, what: str) -> int:
        """The port of the log line `line` matches (its group 1): what the server bound for `what`."""
        found = line.search(self.log.read_text(errors="replace"))
        if found is None:
            raise RuntimeError(f"the server did not announce {what} (see {self.log})")
        return int(found.group(1))

    def rss_bytes(self) -> int:
        """Resident memory now, from the kernel's own count (VmRSS, in KiB)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def stop(self) -> None:
        """SIGTERM for a graceful stop; SIGKILL if it does not come in time."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            found = ADDRESS_LINE.search(self.log.read_text(errors="replace"))
            if found:
                return f"{found.group(1)}:{found.group(2)}"
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{' '.join(self.argv)} did not announce its address (see {self.log}):\n{tail}")
