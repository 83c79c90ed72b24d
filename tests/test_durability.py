"""Sessions across restarts: the `rnnserve-server` command stopped by a signal or killed, then started again.

Predictions are compared as whole protobuf messages, so "bit-identical" means every float of
every probability, not a tolerance. The cases that need no signal run the server in-process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.processes import ServerProcess
from bench.run import server_command
from rnnserve.bundle import Bundle
from rnnserve.server.core.batcher import Batcher
from rnnserve.server.model.runtime import Runtime
from rnnserve.server.settings import Settings, parse_settings
from rnnserve.server.store.snapshot import ModelIdentity, open_snapshot
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import RunningServer, assert_fails, create
from test_metrics import samples, scrape

pytestmark = pytest.mark.every_model

TEXT = "The quick brown fox jumps over the lazy dog."
SPLIT = 8  # tokens read before the restart; the rest after it


def snapshot_flags(path: Path, interval: float = 0.0) -> list[str]:
    return ["--snapshot-path", str(path), "--snapshot-interval-seconds", str(interval)]


@contextlib.contextmanager
def serving(bundle: Bundle, log: Path, flags: list[str]) -> Iterator[tuple[ServerProcess, grpc.Channel]]:
    """The installed `rnnserve-server` on a loopback port, and a channel to it."""
    with ServerProcess(server_command(bundle.path, flags), log) as server, \
            grpc.insecure_channel(server.address) as channel:
        yield server, channel


def text_ids(bundle: Bundle) -> list[int]:
    """TEXT in the bundle's vocabulary: one id a character, or fewer subwords."""
    tokens = bundle.vocab.encode(TEXT).tolist()
    assert len(tokens) > SPLIT + 1
    return tokens


def step(stub, bundle: Bundle, session_id: str, token: int, **fields) -> pb.StepResponse:
    return stub.Step(pb.StepRequest(session_id=session_id, token_ids=[token], top_k=len(bundle.vocab),
                                    **fields))  # every probability


def steps(stub, bundle: Bundle, session_id: str, tokens: list[int]) -> list[pb.Prediction]:
    return [step(stub, bundle, session_id, token).prediction for token in tokens]


def positions_in_snapshot(path: Path, bundle: Bundle, rows: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Each session's position in the snapshot file, read as a restarting server would."""
    snapshot = open_snapshot(path)
    assert [section.model for section in snapshot.header.models] == [ModelIdentity.of(bundle)]
    assert snapshot.header.models[0].rows == rows
    return {record.id: record.position for _, records, _ in snapshot.chunks() for record in records}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda signum: signum.name)
def test_a_session_continues_bit_identically_after_a_signal_and_a_restart(bundle, tmp_path, signum):
    flags = snapshot_flags(tmp_path / "sessions.snap")
    with serving(bundle, tmp_path / "before.log", flags) as (server, channel):
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        tokens = text_ids(bundle)
        control = create(stub, prompt_token_ids=tokens[:SPLIT - 1])  # read in calls of the subject's shapes
        step(stub, bundle, control, tokens[SPLIT - 1])
        expected = steps(stub, bundle, control, tokens[SPLIT:])  # the same session, never restarted
        subject = stub.CreateSession(pb.CreateSessionRequest(prompt_token_ids=tokens[:SPLIT - 1],
                                                             ttl_seconds=600)).session
        last = step(stub, bundle, subject.session_id, tokens[SPLIT - 1], expected_position=SPLIT - 1)
        os.kill(server.pid, signum)
        server.stop()  # waits for the exit
    assert "saved 2 sessions" in (tmp_path / "before.log").read_text()

    with serving(bundle, tmp_path / "after.log", flags) as (_, channel):
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        restored = stub.GetSession(pb.GetSessionRequest(session_id=subject.session_id))
        retried = step(stub, bundle, subject.session_id, tokens[SPLIT - 1], expected_position=SPLIT - 1)
        continued = steps(stub, bundle, subject.session_id, tokens[SPLIT:])
    assert "restored 2 sessions" in (tmp_path / "after.log").read_text()
    assert restored.position == SPLIT and restored.created == subject.created
    assert restored.expires.ToNanoseconds() - restored.last_active.ToNanoseconds() == pytest.approx(600e9, abs=1e6)
    assert retried == last  # the step before the restart, retried, is answered from its record: not applied twice
    assert continued == expected


def test_a_snapshot_of_another_model_is_refused_kept_aside_and_never_loaded(bundles, tmp_path):
    path = tmp_path / "sessions.snap"
    with serving(bundles["gru"], tmp_path / "gru.log", snapshot_flags(path)) as (_, channel):
        gru_session = create(rnnserve_pb2_grpc.InferenceStub(channel), prompt_text="fox")
    written = path.read_bytes()

    with serving(bundles["lstm"], tmp_path / "lstm.log", snapshot_flags(path)) as (_, channel):
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # it starts, with no sessions
        assert_fails(lambda: rnnserve_pb2_grpc.InferenceStub(channel).GetSession(
            pb.GetSessionRequest(session_id=gru_session)), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    log = (tmp_path / "lstm.log").read_text()
    assert "snapshot refused, no session restored" in log
    assert f"holds sessions of model tiny-gru version test (graph sha256 {bundles['gru'].sha256[:12]})" in log
    assert f"this server serves model tiny-lstm version test (graph sha256 {bundles['lstm'].sha256[:12]})" in log
    assert (tmp_path / "sessions.snap.refused").read_bytes() == written  # kept for the model it belongs to


def test_periodic_snapshots_bound_what_kill_9_loses(bundle, tmp_path):
    path, rows = tmp_path / "sessions.snap", Batcher.pool_rows(Runtime(bundle, threads=1, spinning=False))
    flags = snapshot_flags(path, interval=3.0)
    with serving(bundle, tmp_path / "killed.log", flags) as (server, channel):
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        tokens = text_ids(bundle)
        session_id = create(stub, prompt_token_ids=tokens[:SPLIT])
        deadline = time.monotonic() + 10
        while not path.exists() or session_id not in positions_in_snapshot(path, bundle, rows):
            assert time.monotonic() < deadline, "no periodic snapshot within 10 s"
            time.sleep(0.02)
        lost = step(stub, bundle, session_id, tokens[SPLIT])  # after the last snapshot, 3 s before the next: the crash loses it
        os.kill(server.pid, signal.SIGKILL)
        server.stop()
    assert positions_in_snapshot(path, bundle, rows) == {session_id: SPLIT}

    with serving(bundle, tmp_path / "restarted.log", flags) as (_, channel):
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        assert stub.GetSession(pb.GetSessionRequest(session_id=session_id)).position == SPLIT
        assert step(stub, bundle, session_id, tokens[SPLIT]) == lost  # the lost step, sent again, answers exactly as before


def test_periodic_snapshots_need_a_path(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--snapshot-interval-seconds", "5"], environ={})
    assert "snapshot_interval_seconds needs a snapshot_path" in capsys.readouterr().err


# In-process: restoring keeps time-to-live, cap and refusals sane ------------------------------------

def test_a_restart_neither_renews_nor_revives_a_time_to_live(bundle, start_server, tmp_path, caplog):
    flags = {"snapshot_path": str(tmp_path / "sessions.snap")}
    first = RunningServer(bundle, Settings(listen="127.0.0.1:0", **flags))
    with grpc.insecure_channel(first.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        short = create(stub, ttl_seconds=1)
        long = stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=60)).session
    first.stop()
    time.sleep(1.1)  # the short session's time-to-live passes while no server runs
    with caplog.at_level(logging.INFO, "rnnserve.server.store.durability"):
        second = start_server(**flags)
    assert "restored 1 sessions" in caplog.text and "1 had expired meanwhile" in caplog.text
    with grpc.insecure_channel(second.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        assert_fails(lambda: stub.GetSession(pb.GetSessionRequest(session_id=short)), grpc.StatusCode.NOT_FOUND)
        restored = stub.GetSession(pb.GetSessionRequest(session_id=long.session_id))
    assert restored.expires.ToNanoseconds() == pytest.approx(long.expires.ToNanoseconds(), abs=1e6)


@pytest.mark.parametrize("cap", ["max_sessions", "max_sessions_per_identity"])
def test_a_smaller_cap_after_a_restart_keeps_the_most_recently_active(bundle, start_server, tmp_path, caplog, cap):
    flags = {"snapshot_path": str(tmp_path / "sessions.snap")}
    first = RunningServer(bundle, Settings(listen="127.0.0.1:0", **flags))
    with grpc.insecure_channel(first.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        sessions = [create(stub) for _ in range(3)]
        for session_id in (sessions[1], sessions[0], sessions[2]):  # sessions[1] is now the least recently active
            step(stub, bundle, session_id, 1)
    first.stop()
    with caplog.at_level(logging.INFO, "rnnserve.server.store.durability"):
        second = start_server(**{cap: 2}, metrics_listen="127.0.0.1:0", **flags)
    assert "restored 2 sessions" in caplog.text and "1 did not fit max_sessions" in caplog.text
    found = {name: value for (name, _), value in samples(scrape(f"http://127.0.0.1:{second.server.metrics_port}"
                                                                 "/metrics")).items()}
    assert (found["rnnserve_sessions_restored_total"], found["rnnserve_sessions_created_total"],
            found["rnnserve_sessions_active"]) == (2, 0, 2)  # created + restored = active + ended
    with grpc.insecure_channel(second.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        assert [stub.GetSession(pb.GetSessionRequest(session_id=s)).position for s in (sessions[0], sessions[2])] == \
            [1, 1]
        assert_fails(lambda: stub.GetSession(pb.GetSessionRequest(session_id=sessions[1])), grpc.StatusCode.NOT_FOUND)


def test_a_corrupt_snapshot_is_refused_and_the_server_starts_empty(bundle, start_server, tmp_path, caplog):
    path = tmp_path / "sessions.snap"
    first = RunningServer(bundle, Settings(listen="127.0.0.1:0", snapshot_path=str(path)))
    with grpc.insecure_channel(first.address) as channel:
        create(rnnserve_pb2_grpc.InferenceStub(channel), prompt_text="fox")
    first.stop()
    damaged = path.read_bytes()[:-1]
    path.write_bytes(damaged)
    with caplog.at_level(logging.INFO, "rnnserve.server.store.durability"):
        second = start_server(snapshot_path=str(path))
    assert "snapshot refused, no session restored" in caplog.text and "corrupt or truncated" in caplog.text
    assert len(second.engine.table) == 0 and (tmp_path / "sessions.snap.refused").read_bytes() == damaged
