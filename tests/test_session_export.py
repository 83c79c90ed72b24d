"""Export and import: a session moves to another server process and continues bit-exactly; bad blobs change nothing."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from serving import RunningServer, assert_fails, create, position

from rnnserve.server.settings import Settings
from rnnserve.server.store import session_blob
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc

pytestmark = pytest.mark.every_model


@pytest.fixture
def second_process(bundle) -> Iterator[rnnserve_pb2_grpc.InferenceStub]:
    """A real `rnnserve-server` process of the same bundle, apart from the test's own server."""
    environ = {**os.environ, "RNNSERVE_BUNDLE": str(bundle.path), "RNNSERVE_REWIND_DEPTH": "16",
               "RNNSERVE_REWIND_CHECKPOINT_EVERY": "4"}
    process = subprocess.Popen([sys.executable, "-m", "rnnserve.server.main", "--listen", "127.0.0.1:0"],
                               env=environ, stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r"port (\d+)", process.stderr.readline()).group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield rnnserve_pb2_grpc.InferenceStub(channel)
    finally:
        process.kill()
        process.wait()


def step(stub, session_id: str, *tokens: int) -> pb.StepResponse:
    return stub.Step(pb.StepRequest(session_id=session_id, token_ids=list(tokens), top_k=5))


def test_an_imported_session_continues_bit_exactly_in_another_process(start_server, second_process):
    first = start_server(rewind_depth=16, rewind_checkpoint_every=4)
    with grpc.insecure_channel(first.address) as channel:
        here = rnnserve_pb2_grpc.InferenceStub(channel)
        session = create(here, prompt_token_ids=[3, 5, 7, 9, 11])
        for token in (2, 4, 6, 8, 10, 12, 14):
            step(here, session, token)
        exported = here.ExportSession(pb.ExportSessionRequest(session_id=session, expected_position=12))
        assert exported.session.position == 12 and position(here, session) == 12  # exporting changes nothing
        assert len(exported.state) < 64 * 1024
        imported = second_process.ImportSession(pb.ImportSessionRequest(state=exported.state, top_k=5))
        moved = imported.session.session_id
        assert imported.session.position == 12 and moved != session
        assert imported.session.rewindable == exported.session.rewindable > 0
        here_answer, there_answer = step(here, session, 1), step(second_process, moved, 1)
        assert list(here_answer.prediction.probabilities) == list(there_answer.prediction.probabilities)
        assert list(here_answer.prediction.token_ids) == list(there_answer.prediction.token_ids)
        # the token log and checkpoints travelled too: a rewind there equals a rewind here
        back_here = here.RewindSession(pb.RewindSessionRequest(session_id=session, tokens=6))
        back_there = second_process.RewindSession(pb.RewindSessionRequest(session_id=moved, tokens=6))
        assert back_here.session.position == back_there.session.position == 7
        assert list(back_here.prediction.probabilities) == list(back_there.prediction.probabilities)


def corrupt(blob: bytes) -> bytes:
    middle = len(blob) // 2
    return blob[:middle] + bytes([blob[middle] ^ 0xFF]) + blob[middle + 1:]


def other_version(blob: bytes) -> bytes:
    return blob[:8] + struct.pack("<I", session_blob.FORMAT_VERSION + 1) + blob[12:]


@pytest.mark.parametrize(("damage", "code", "reason"), [
    (lambda blob: blob[: len(blob) // 2], grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (corrupt, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (lambda blob: b"not a session at all", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (lambda blob: b"", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (other_version, grpc.StatusCode.FAILED_PRECONDITION, "INCOMPATIBLE_STATE"),
], ids=["truncated", "corrupted", "foreign", "empty", "other-format-version"])
def test_a_damaged_blob_is_refused_naming_what_is_wrong_and_nothing_changes(stub, shared_server, damage, code,
                                                                            reason):
    session = create(stub, prompt_token_ids=[1, 2, 3])
    blob = stub.ExportSession(pb.ExportSessionRequest(session_id=session)).state
    held = len(shared_server.engine.table)
    error, _ = assert_fails(lambda: stub.ImportSession(pb.ImportSessionRequest(state=damage(blob))), code, reason)
    assert "state" in error.details()
    assert len(shared_server.engine.table) == held and position(stub, session) == 3


def test_a_blob_of_another_model_is_refused_failed_precondition(bundles, start_server):
    gru, lstm = start_server(bundles["gru"]), start_server(bundles["lstm"])
    with grpc.insecure_channel(gru.address) as gru_channel, grpc.insecure_channel(lstm.address) as lstm_channel:
        from_gru = rnnserve_pb2_grpc.InferenceStub(gru_channel)
        to_lstm = rnnserve_pb2_grpc.InferenceStub(lstm_channel)
        blob = from_gru.ExportSession(pb.ExportSessionRequest(session_id=create(from_gru, prompt_token_ids=[1]))).state
        error, info = assert_fails(lambda: to_lstm.ImportSession(pb.ImportSessionRequest(state=blob)),
                                   grpc.StatusCode.FAILED_PRECONDITION, "INCOMPATIBLE_STATE")
        assert "tiny-gru" in error.details() and "tiny-lstm" in error.details()
        assert len(lstm.engine.table) == 0


def test_imports_count_against_the_cap(start_server):
    running = start_server(max_sessions=2)
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        first = create(stub, prompt_token_ids=[4])
        blob = stub.ExportSession(pb.ExportSessionRequest(session_id=first)).state
        stub.ImportSession(pb.ImportSessionRequest(state=blob))
        assert_fails(lambda: stub.ImportSession(pb.ImportSessionRequest(state=blob)),
                     grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED")
        assert len(running.engine.table) == 2


def test_forked_and_imported_sessions_survive_a_restart(bundle, start_server, tmp_path):
    snapshot = str(tmp_path / "sessions.snap")
    first = RunningServer(bundle, Settings(listen="127.0.0.1:0", snapshot_path=snapshot))  # stopped here, by hand
    with grpc.insecure_channel(first.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        source = create(stub, prompt_token_ids=[2, 7, 1, 8])
        [fork] = stub.ForkSession(pb.ForkSessionRequest(session_id=source)).sessions
        blob = stub.ExportSession(pb.ExportSessionRequest(session_id=source)).state
        imported = stub.ImportSession(pb.ImportSessionRequest(state=blob)).session
        expected = step(stub, source, 3).prediction
    first.stop()
    second = start_server(snapshot_path=snapshot)
    with grpc.insecure_channel(second.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        for session in (fork.session_id, imported.session_id):
            assert position(stub, session) == 4
            assert list(step(stub, session, 3).prediction.probabilities) == list(expected.probabilities)


def test_a_forged_blob_with_a_valid_checksum_is_still_checked(stub, shared_server):
    """The checksum catches damage, not forgery: ids the server would replay are checked against the vocabulary."""
    engine = shared_server.engine
    session = create(stub, prompt_token_ids=[1, 2, 3])
    blob = stub.ExportSession(pb.ExportSessionRequest(session_id=session)).state
    served = shared_server.model
    model, shapes = served.identity, served.shapes
    portable = session_blob.decode(blob, model, shapes, len(served.bundle.vocab))
    portable.tokens[0] = 10_000
    forged = session_blob.encode(portable, model, shapes)
    held = len(engine.table)
    error, _ = assert_fails(lambda: stub.ImportSession(pb.ImportSessionRequest(state=forged)),
                            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", field="state")
    assert "vocabulary" in error.details() and len(engine.table) == held
