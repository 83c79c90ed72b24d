"""Several models and versions from a model repository, hot reload under a steady stream, and the Admin service.

Every server here is real and serves a repository of tiny bundles on a loopback port; "bit-exact"
is checked against a second server that serves the old version alone and never reloaded.
"""

import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from rnnserve.bundle import load_bundle
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import RunningServer, assert_fails, create, repository, stateless_copy

POLL_SECONDS = 0.1
TOKENS = 40  # steps of each old session, spread over before and after the swap


def drop_in(versions: Path, repo: Path, name: str, damage=None) -> None:
    """Copy a version in as an operator should: under a hidden name, then renamed into place whole."""
    hidden = repo / name.split("/")[0] / f".incoming-{name.split('/')[1]}"
    shutil.copytree(versions / name, hidden)
    if damage is not None:
        damage(hidden)
    hidden.rename(repo / name)


def serve(repo: Path, **settings) -> RunningServer:
    return RunningServer(None, Settings(**{"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                                           "model_repository": repo, "model_poll_seconds": POLL_SECONDS, **settings}))


def listed(stub) -> dict[tuple[str, str], pb.Model]:
    return {(model.name, model.version): model for model in stub.ListModels(pb.ListModelsRequest()).models}


def wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def metric(running: RunningServer, name: str, **labels: str) -> float:
    """The value of one series on the server's /metrics page (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{running.server.metrics_port}/metrics").read().decode()
    wanted = ",".join(sorted(f'{key}="{value}"' for key, value in labels.items()))
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and ",".join(sorted(series.partition("{")[2].rstrip("}").split(","))) == wanted:
            return float(value)
    return 0.0


def test_two_models_serve_side_by_side_each_session_on_its_own(tmp_path, versions):
    running = serve(repository(tmp_path, versions, "tiny/1", "other/1"), default_model="tiny")
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = rnnserve_pb2_grpc.InferenceStub(channel)
            models = listed(stub)
            assert list(models) == [("tiny", "1"), ("other", "1")]  # the default model first
            assert models["tiny", "1"].is_default and models["tiny", "1"].default_version
            assert not models["other", "1"].is_default and models["other", "1"].default_version
            assert models["other", "1"].cell == "gru"
            tiny, other = create(stub, prompt_text="The q"), create(stub, model="other", prompt_text="The q")
            described = {s: stub.GetSession(pb.GetSessionRequest(session_id=s)) for s in (tiny, other)}
            assert (described[tiny].model, described[tiny].model_version) == ("tiny", "1")
            assert (described[other].model, described[other].model_version) == ("other", "1")
            steps = [stub.Step(pb.StepRequest(session_id=s, text="u", top_k=3)) for s in (tiny, other)]
            assert steps[0].prediction.probabilities != steps[1].prediction.probabilities  # two models, two answers
            assert listed(stub)["other", "1"].sessions == 1
            assert_fails(lambda: create(stub, model="tiny", model_version="7"), grpc.StatusCode.NOT_FOUND,
                         "MODEL_NOT_FOUND")
            assert_fails(lambda: create(stub, model="nothing"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    finally:
        running.stop()


class SteadyStream:
    """Sessions stepped over one Stream, round-robin, a step at a time, until `stop`; every answer is kept."""

    def __init__(self, channel: grpc.Channel, sessions: list[str]):
        self.sessions = sessions
        self.answers: dict[str, list[pb.StepResponse]] = {session: [] for session in sessions}
        self._stub = rnnserve_pb2_grpc.InferenceStub(channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def token(session_index: int, step: int) -> int:
        return (7 * step + 3 * session_index) % 20 + 1

    def _requests(self):
        for step in range(TOKENS):
            for index, session in enumerate(self.sessions):
                yield pb.StepRequest(session_id=session, token_ids=[self.token(index, step)], top_k=5)
            if step >= TOKENS // 4:
                self._stop.wait(0.02)  # steady, spread over the swap

    def _run(self) -> None:
        for response in self._stub.Stream(self._requests()):
            self.answers[response.session_id].append(response)

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive()


def test_a_version_dropped_in_takes_new_sessions_while_running_ones_stay_bit_exact(tmp_path, versions):
    repo = repository(tmp_path, versions, "tiny/1")
    running, reference = serve(repo), serve(repository(tmp_path / "reference", versions, "tiny/1"),
                                            model_poll_seconds=0)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = rnnserve_pb2_grpc.InferenceStub(channel)
            old = [create(stub, prompt_text="The ") for _ in range(3)]
            stream = SteadyStream(channel, old)
            wait_for(lambda: len(stream.answers[old[0]]) >= TOKENS // 4)
            drop_in(versions, repo, "tiny/2")
            wait_for(lambda: listed(stub).get(("tiny", "2")) is not None and listed(stub)["tiny", "2"].default_version)
            new = create(stub, prompt_text="The ")
            assert stub.GetSession(pb.GetSessionRequest(session_id=new)).model_version == "2"
            assert listed(stub)["tiny", "1"].retiring  # its running sessions keep it
            swapped_at = len(stream.answers[old[0]])
            stream.join()
            assert swapped_at < TOKENS  # steps ran on the old version after the new one took over

            answers = [answer for session in old for answer in stream.answers[session]]
            assert len(answers) == len(old) * TOKENS and not any(a.HasField("error") for a in answers)
            with grpc.insecure_channel(reference.address) as reference_channel:
                never_reloaded = rnnserve_pb2_grpc.InferenceStub(reference_channel)
                for index, session in enumerate(old):
                    twin = create(never_reloaded, prompt_text="The ")
                    for step, answer in enumerate(stream.answers[session]):
                        expected = never_reloaded.Step(pb.StepRequest(session_id=twin, top_k=5,
                                                                      token_ids=[SteadyStream.token(index, step)]))
                        assert answer.prediction == expected.prediction  # bit-exact: every float equal
                    stub.CloseSession(pb.CloseSessionRequest(session_id=session))
            wait_for(lambda: ("tiny", "1") not in listed(stub))  # its last session closed: unloaded
            assert metric(running, "rnnserve_model_loads_total", model="tiny", model_version="2",
                          result="loaded") == 1
    finally:
        running.stop()
        reference.stop()


def test_a_broken_version_dropped_in_is_refused_and_changes_nothing(tmp_path, versions, caplog):
    repo = repository(tmp_path, versions, "tiny/1")
    running = serve(repo)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = rnnserve_pb2_grpc.InferenceStub(channel)
            session = create(stub, prompt_text="The ")
            before = stub.Step(pb.StepRequest(session_id=session, text="q"))
            drop_in(versions, repo, "tiny/2", damage=lambda bundle: (bundle / "model.onnx").write_bytes(b"not onnx"))
            wait_for(lambda: metric(running, "rnnserve_model_loads_total", model="tiny", model_version="2",
                                    result="refused") == 1)
            assert "model tiny version 2 not loaded" in caplog.text and "sha256" in caplog.text
            models = listed(stub)
            assert list(models) == [("tiny", "1")] and models["tiny", "1"].default_version
            assert stub.GetSession(pb.GetSessionRequest(session_id=create(stub))).model_version == "1"
            after = stub.Step(pb.StepRequest(session_id=session, text="u"))
            assert after.position == before.position + 1 and not after.HasField("error")
            time.sleep(5 * POLL_SECONDS)  # refused as it is: not retried at every poll
            assert metric(running, "rnnserve_model_loads_total", model="tiny", model_version="2",
                          result="refused") == 1
    finally:
        running.stop()


ADMIN_TOKEN, USER_TOKEN = "admin-token-0123456789", "user-token-0123456789"


def admin_call(channel, token: str):
    return rnnserve_pb2_grpc.AdminStub(channel), [("authorization", f"Bearer {token}")]


def test_admin_loads_sets_defaults_and_unloads_with_its_own_tokens(tmp_path, versions):
    repo = repository(tmp_path, versions, "tiny/1")
    (tmp_path / "tokens").write_text(f"{USER_TOKEN} user\n")
    (tmp_path / "admin-tokens").write_text(f"{ADMIN_TOKEN} operator\n")
    running = serve(repo, model_poll_seconds=0, auth_tokens_file=tmp_path / "tokens",
                    admin_tokens_file=tmp_path / "admin-tokens")
    shutil.copytree(versions / "tiny" / "2", repo / "tiny" / "2")  # not polled: loaded by a call
    try:
        with grpc.insecure_channel(running.address) as channel:
            admin, as_admin = admin_call(channel, ADMIN_TOKEN)
            inference, as_user = rnnserve_pb2_grpc.InferenceStub(channel), [("authorization", f"Bearer {USER_TOKEN}")]
            assert_fails(lambda: admin.LoadModel(pb.LoadModelRequest(name="tiny", version="2"), metadata=as_user),
                         grpc.StatusCode.UNAUTHENTICATED)
            assert_fails(lambda: inference.ListModels(pb.ListModelsRequest(), metadata=as_admin),
                         grpc.StatusCode.UNAUTHENTICATED)  # admin tokens open Admin only
            assert set(listed_as(inference, as_user)) == {("tiny", "1")}  # version 2 waits for a call

            loaded = admin.LoadModel(pb.LoadModelRequest(name="tiny", version="2"), metadata=as_admin)
            assert (loaded.version, loaded.default_version) == ("2", False)
            session = inference.CreateSession(pb.CreateSessionRequest(model_version="2"), metadata=as_user).session
            assert session.model_version == "2"
            assert_fails(lambda: admin.UnloadModel(pb.UnloadModelRequest(name="tiny", version="1"), metadata=as_admin),
                         grpc.StatusCode.FAILED_PRECONDITION, "MODEL_IS_DEFAULT")
            made = admin.SetDefaultModel(pb.SetDefaultModelRequest(name="tiny", version="2"), metadata=as_admin)
            assert made.default_version and made.is_default
            unloaded = admin.UnloadModel(pb.UnloadModelRequest(name="tiny", version="1"), metadata=as_admin)
            assert unloaded.retiring and unloaded.sessions == 0
            assert set(listed_as(inference, as_user)) == {("tiny", "2")}  # no session held it: gone at once
            assert_fails(lambda: admin.LoadModel(pb.LoadModelRequest(name="tiny", version="9"), metadata=as_admin),
                         grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
            assert_fails(lambda: admin.LoadModel(pb.LoadModelRequest(name="tiny"), metadata=as_admin),
                         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "version")
            stateless_copy(load_bundle(versions / "tiny" / "1"), repo / "tiny" / "3", version="3")
            error, _ = assert_fails(lambda: admin.LoadModel(pb.LoadModelRequest(name="tiny", version="3",
                                                                                make_default=True), metadata=as_admin),
                                    grpc.StatusCode.FAILED_PRECONDITION, "MODEL_REFUSED")
            assert "differ from one call" in error.details()  # the parity self-test names what failed
            assert set(listed_as(inference, as_user)) == {("tiny", "2")} and made.default_version
    finally:
        running.stop()


def listed_as(stub, metadata) -> list[tuple[str, str]]:
    return [(model.name, model.version) for model in stub.ListModels(pb.ListModelsRequest(), metadata=metadata).models]


def test_with_tokens_on_and_no_admin_tokens_nobody_may_call_admin(tmp_path, versions):
    (tmp_path / "tokens").write_text(f"{USER_TOKEN} user\n")
    running = serve(repository(tmp_path, versions, "tiny/1"), model_poll_seconds=0,
                    auth_tokens_file=tmp_path / "tokens")
    try:
        with grpc.insecure_channel(running.address) as channel:
            admin, as_user = admin_call(channel, USER_TOKEN)
            assert_fails(lambda: admin.SetDefaultModel(pb.SetDefaultModelRequest(name="tiny", version="1"),
                                                       metadata=as_user), grpc.StatusCode.UNAUTHENTICATED)
    finally:
        running.stop()


def test_sessions_of_two_models_survive_a_restart_and_those_of_a_model_gone_are_kept_aside(tmp_path, versions):
    repo = repository(tmp_path, versions, "tiny/1", "other/1")
    snapshot = tmp_path / "sessions.snap"
    first = serve(repo, model_poll_seconds=0, default_model="tiny", snapshot_path=str(snapshot))
    with grpc.insecure_channel(first.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        tiny, other = create(stub, prompt_text="The q"), create(stub, model="other", prompt_text="The q")
        expected = {s: stub.Peek(pb.StepRequest(session_id=s, text="u")).prediction for s in (tiny, other)}
    first.stop()
    second = serve(repo, model_poll_seconds=0, default_model="tiny", snapshot_path=str(snapshot))
    try:
        with grpc.insecure_channel(second.address) as channel:
            stub = rnnserve_pb2_grpc.InferenceStub(channel)
            for session, prediction in expected.items():
                assert stub.Step(pb.StepRequest(session_id=session, text="u")).prediction == prediction
            assert stub.GetSession(pb.GetSessionRequest(session_id=other)).model == "other"
    finally:
        second.stop()
    shutil.rmtree(repo / "other")
    third = serve(repo, model_poll_seconds=0, snapshot_path=str(snapshot))
    try:
        with grpc.insecure_channel(third.address) as channel:
            stub = rnnserve_pb2_grpc.InferenceStub(channel)
            assert stub.GetSession(pb.GetSessionRequest(session_id=tiny)).position == 6
            assert_fails(lambda: stub.GetSession(pb.GetSessionRequest(session_id=other)), grpc.StatusCode.NOT_FOUND)
        assert (tmp_path / "sessions.snap.unrestored").exists()  # kept for a server that serves "other" again
    finally:
        third.stop()


def test_one_graph_under_two_names_keeps_each_session_on_its_own_name(tmp_path, versions):
    """An alias (a canary, a tenant's name) serves the same graph as another model: a session exported from it, or
    restored after a restart, comes back under its own name, not the first with that graph."""
    repo = repository(tmp_path, versions, "tiny/1")
    shutil.copytree(repo / "tiny" / "1", repo / "alias" / "1")
    manifest = json.loads((repo / "alias" / "1" / "manifest.json").read_text())
    (repo / "alias" / "1" / "manifest.json").write_text(json.dumps({**manifest, "name": "alias"}))
    snapshot = tmp_path / "sessions.snap"
    first = serve(repo, model_poll_seconds=0, default_model="tiny", snapshot_path=str(snapshot))
    with grpc.insecure_channel(first.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        session = create(stub, model="alias", prompt_text="The q")
        blob = stub.ExportSession(pb.ExportSessionRequest(session_id=session)).state
        imported = stub.ImportSession(pb.ImportSessionRequest(state=blob)).session
        assert imported.model == "alias"
    first.stop()
    second = serve(repo, model_poll_seconds=0, default_model="tiny", snapshot_path=str(snapshot))
    try:
        with grpc.insecure_channel(second.address) as channel:
            stub = rnnserve_pb2_grpc.InferenceStub(channel)
            assert stub.GetSession(pb.GetSessionRequest(session_id=session)).model == "alias"
            assert listed(stub)["alias", "1"].sessions == 2 and listed(stub)["tiny", "1"].sessions == 0
    finally:
        second.stop()
