"""Load and faults, bounded for CI (each test well under a minute on 2 cores).

The soak: thousands of sessions streaming from client processes, some cancelling, missing
deadlines or dropping their connection mid-stream, and one whole client killed mid-run; then
nothing leaks. The flood: eight times the cap in creations; resident memory stays within the
configured bound and the health check keeps answering. Then a full table's sessions expire
and the server's resident memory returns to its baseline.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.processes import ServerProcess
from bench.run import server_command
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import build_tiny_bundle
from soak_load import ENDINGS
from test_metrics import samples, scrape

SOAK_LOAD = Path(__file__).with_name("soak_load.py")
SERVER_CODES = {"OK", "NOT_FOUND", "RESOURCE_EXHAUSTED"}  # NOT_FOUND: evicted mid-stream; RESOURCE_EXHAUSTED: all busy
ENDED = ("closed", "expired", "evicted")


def start_load(address: str, sessions: int, concurrency: int, seed: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SOAK_LOAD), address, str(sessions), str(concurrency), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def created_ids(output: str) -> set[str]:
    return {line.split()[1] for line in output.splitlines() if line.startswith("created ")}


def session_counts(metrics_port: int) -> dict[str, float]:
    """Sessions created, held now, and ended by reason, as Prometheus would scrape them."""
    found = collections.Counter()
    for (name, labels), value in samples(scrape(f"http://127.0.0.1:{metrics_port}/metrics")).items():
        if name == "rnnserve_sessions_created_total":
            found["created"] += value
        elif name == "rnnserve_sessions_active":
            found["active"] += value
        elif name == "rnnserve_sessions_ended_total":
            found[dict(labels)["reason"]] += value
    return found


def metrics_port(server: ServerProcess) -> int:
    """The port `rnnserve-server` announced for /metrics."""
    return int(re.search(r"metrics at /metrics on \S+, port (\d+)", server.log.read_text()).group(1))


def wait_until_empty(running, timeout: float = 10.0) -> None:
    """Until every session has closed, expired or been evicted."""
    deadline = time.monotonic() + timeout
    while len(running.engine.table):
        assert time.monotonic() < deadline, f"{len(running.engine.table)} sessions outlived their time-to-live"
        time.sleep(0.1)


def test_soak_leaves_no_tasks_sessions_or_memory_behind(start_server):
    running = start_server(max_sessions=150, when_full="evict-oldest", sweep_seconds=0.1,
                           metrics_listen="127.0.0.1:0")
    warm_up = start_load(running.address, 300, 50, seed=0)  # gRPC's and the allocator's high-water marks: not leaks
    assert warm_up.wait(60) == 0, warm_up.stderr.read()
    wait_until_empty(running)
    tasks, resident = running.task_count(), psutil.Process().memory_info().rss

    steady, doomed = start_load(running.address, 2_000, 100, seed=1), start_load(running.address, 10_000, 30, seed=2)
    time.sleep(3)
    doomed.send_signal(signal.SIGKILL)  # a whole client gone mid-stream: its connections drop under open calls
    doomed_output, _ = doomed.communicate()
    steady_output, errors = steady.communicate(timeout=60)
    assert steady.returncode == 0, errors
    wait_until_empty(running)
    drained = psutil.Process().memory_info().rss

    report = json.loads(steady_output.splitlines()[-1])
    assert set(report["codes"]) <= SERVER_CODES and report["codes"]["OK"] > 10_000
    assert all(report["endings"][ending] > 50 for ending in ENDINGS)
    assert running.task_count() == tasks
    counts = session_counts(running.server.metrics_port)
    assert counts["active"] == 0 and all(counts[reason] > 0 for reason in ENDED)
    assert counts["created"] == sum(counts[reason] for reason in ENDED)
    assert counts["created"] >= 300 + len(created_ids(steady_output) | created_ids(doomed_output))
    assert drained < resident + 8 * 2**20


CAP, CLIENTS = 2_000, 8
FLOOD_ROUNDS, FLOOD_PER_ROUND = 4, 4_000  # 16,000 creations, eight times the cap
CONSTANT_BYTES = 16 * 2**20  # the Python objects of CAP sessions, gRPC's buffers, the allocators' slack
# Few remembered ids: each outlives its session, and thousands of them, interleaved with the
# sessions' freed objects, would keep Python's allocator from handing that memory back.
FLAGS = ["--max-sessions", str(CAP), "--when-full", "evict-oldest", "--remember-removed", "100",
         "--sweep-seconds", "0.1", "--metrics-listen", "127.0.0.1:0"]


async def create_sessions(address: str, count: int, ttl_seconds: int) -> None:
    """`count` sessions, from CLIENTS clients on channels of their own; each prompt's step writes its state rows."""

    async def client() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = rnnserve_pb2_grpc.InferenceStub(channel)
            for _ in range(count // CLIENTS):
                await stub.CreateSession(pb.CreateSessionRequest(prompt_text="a", ttl_seconds=ttl_seconds))

    await asyncio.gather(*(client() for _ in range(CLIENTS)))


class HealthWatch(threading.Thread):
    """Checks health every 50 ms (each check given 2 s) until stopped, noting each answer and the server's memory."""

    def __init__(self, server: ServerProcess):
        super().__init__(daemon=True)
        self.server = server
        self.answers: list[tuple[object, int]] = []  # (status or error code, resident bytes)
        self.stopping = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not self.stopping.wait(0.05):
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                except grpc.RpcError as error:
                    answer = error.code()
                self.answers.append((answer, self.server.rss_bytes()))


@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory):
    """A tiny model with 4 KiB of state per session, so that the state dominates a session's memory."""
    return build_tiny_bundle("lstm", tmp_path_factory.mktemp("wide"), hidden_size=256)


def cap_bytes(bundle) -> int:
    """The state and next-token logits of CAP sessions: what the configuration bounds."""
    return CAP * (bundle.state_bytes_per_session + 4 * len(bundle.vocab))


def test_a_flood_of_sessions_keeps_memory_bounded_and_health_answering(wide_bundle, tmp_path):
    with ServerProcess(server_command(wide_bundle.path, FLAGS), tmp_path / "server.log") as server:
        asyncio.run(create_sessions(server.address, CLIENTS, ttl_seconds=3600))  # the first calls' one-off costs
        baseline = server.rss_bytes()
        watch = HealthWatch(server)
        watch.start()
        after_round = []
        for _ in range(FLOOD_ROUNDS):  # sessions outlive the flood, so past the cap every creation evicts
            asyncio.run(create_sessions(server.address, FLOOD_PER_ROUND, ttl_seconds=3600))
            after_round.append(server.rss_bytes())
        watch.stopping.set()
        watch.join()
        counts = session_counts(metrics_port(server))
    assert max(resident for _, resident in watch.answers) < baseline + cap_bytes(wide_bundle) + CONSTANT_BYTES
    assert after_round[-1] - after_round[0] < 4 * 2**20  # memory stays flat however many more come
    assert counts["created"] - counts["evicted"] == counts["active"] == CAP
    assert counts["created"] == CLIENTS + FLOOD_ROUNDS * FLOOD_PER_ROUND
    assert len(watch.answers) > 100 and {answer for answer, _ in watch.answers} == {
        health_pb2.HealthCheckResponse.SERVING}


def test_memory_returns_to_its_baseline_once_the_sessions_expire(wide_bundle, tmp_path):
    ttl_seconds = 10  # outlives creating CAP sessions at 200 a second: the pool reaches the cap's rows
    with ServerProcess(server_command(wide_bundle.path, FLAGS), tmp_path / "server.log") as server:
        asyncio.run(create_sessions(server.address, CLIENTS, ttl_seconds))
        baseline = server.rss_bytes()
        asyncio.run(create_sessions(server.address, CAP, ttl_seconds))
        held = server.rss_bytes()
        deadline = time.monotonic() + ttl_seconds + 10
        while "expired sessions; 0 remain" not in server.log.read_text():  # watched in the log: a scrape's thread
            assert time.monotonic() < deadline, "sessions outlived their time-to-live"  # would cost memory itself
            time.sleep(0.1)
        drained = server.rss_bytes()
    # The pool gave the rows back; what stays is the allocators' high-water mark, not the rows.
    assert held - baseline > cap_bytes(wide_bundle) // 2 and drained - baseline < cap_bytes(wide_bundle) * 3 // 4
