"""The clients and `rnnserve-client` over several models and versions, and the Admin calls with a token of their
own: real servers serving a repository of tiny bundles (conftest's `versions`), on loopback ports."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rnnserve.client import (AsyncClient, Client, ModelIsDefault, ModelNotFound, ModelRetiring, StateIsShipped,
                             StateNotFound, Unauthenticated)
from rnnserve.server.settings import Settings
from serving import RunningServer, free_port, repository

COMMAND = str(Path(sys.executable).with_name("rnnserve-client"))
ADMIN_TOKEN, USER_TOKEN = "admin-token-0123456789", "user-token-0123456789"


def serve(repo: Path, **settings) -> RunningServer:
    """A server of `repo`, "tiny" its default model; no polling, so that only Admin calls load versions."""
    return RunningServer(None, Settings(**{"listen": "127.0.0.1:0", "model_repository": repo, "model_poll_seconds": 0,
                                           "default_model": "tiny", **settings}))


@pytest.fixture
def three_versions(tmp_path, versions):
    """tiny 1 and 2 (2 the default, as the highest) and other 1; no tokens."""
    running = serve(repository(tmp_path, versions, "tiny/1", "tiny/2", "other/1"))
    yield running
    running.stop()


@pytest.fixture
def with_admin_tokens(tmp_path, versions):
    """tiny 1 loaded and tiny 2 in the repository only; callers' tokens and admin tokens (`admin_only=True`:
    admin tokens alone, the Inference service open)."""
    started = []

    def start(admin_only: bool = False) -> RunningServer:
        repo = repository(tmp_path, versions, "tiny/1")
        (tmp_path / "tokens").write_text(f"{USER_TOKEN} user\n")
        (tmp_path / "admin-tokens").write_text(f"{ADMIN_TOKEN} operator\n")
        tokens = {} if admin_only else {"auth_tokens_file": tmp_path / "tokens"}
        started.append(serve(repo, admin_tokens_file=tmp_path / "admin-tokens", **tokens))
        shutil.copytree(versions / "tiny" / "2", repo / "tiny" / "2")  # after the start: loaded by a call only
        return started[-1]

    yield start
    for running in started:
        running.stop()


def wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_session_runs_the_version_it_asked_for_and_says_which(three_versions):
    with Client(three_versions.address) as client:
        with client.session("The q") as default, client.session("The q", model_version=1) as first, \
                client.session("The q", model="other") as other:
            assert (default.model, default.model_version) == ("tiny", "2")
            assert (first.model, first.model_version) == ("tiny", "1")  # a version may be given as its number
            assert (other.model, other.model_version) == ("other", "1")
            assert first.info().model_version == "1" and "model_version='1'" in repr(first)
            assert default.prediction != first.prediction  # two versions, two sets of weights
            assert first.step("u") == client.session("The q", model_version="1").step("u")
            with pytest.raises(ModelNotFound):
                client.session(model_version=7)


def test_models_lists_every_version_with_its_defaults_and_sessions(three_versions):
    with Client(three_versions.address) as client:
        models = {(model.name, model.version): model for model in client.models()}
        assert list(models) == [("tiny", "1"), ("tiny", "2"), ("other", "1")]  # the default model first
        assert models["tiny", "2"].is_default and models["tiny", "2"].default_version
        assert not models["tiny", "1"].is_default and not models["tiny", "1"].default_version
        assert models["other", "1"].default_version and not models["other", "1"].is_default
        assert not any(model.retiring or model.sessions for model in models.values())
        with client.session(model_version=1), client.session(model_version=1):
            assert client.model("tiny", 1).sessions == 2 and client.model("tiny").sessions == 0
        assert client.model("tiny").version == "2" and client.model("other").cell == "gru"
        assert client.model("tiny", "1").sessions == 0


def test_named_states_belong_to_the_version_they_were_registered_on(three_versions):
    with Client(three_versions.address) as client:
        registered = client.register_state("intro", "The quick", model_version=1)
        assert registered.prompt_tokens == len("The quick")
        assert "intro" in [state.name for state in client.states(model="tiny", model_version=1)]
        assert "intro" not in [state.name for state in client.states()]  # the default version, 2, has none
        with pytest.raises(StateNotFound):
            client.session(initial_state="intro")
        with client.session(initial_state="intro", model_version=1) as session:
            assert session.info().initial_state == "intro"
        with pytest.raises(StateNotFound):
            client.delete_state("intro")
        client.delete_state("intro", model_version=1)
        assert "intro" not in [state.name for state in client.states(model_version=1)]


def test_admin_loads_sets_defaults_and_unloads_with_the_admin_token(with_admin_tokens):
    running = with_admin_tokens()
    with Client(running.address, token=USER_TOKEN, admin_token=ADMIN_TOKEN) as client:
        loaded = client.admin.load_model("tiny", 2)
        assert (loaded.version, loaded.default_version, loaded.sessions, loaded.retiring) == ("2", False, 0, False)
        assert client.admin.load_model("tiny", "2") == loaded  # loaded already: answered as it is
        old = client.session("The")
        assert old.model_version == "1"
        with pytest.raises(ModelIsDefault):
            client.admin.unload_model("tiny", 1)
        made = client.admin.set_default_model("tiny", 2)
        assert made.default_version and made.is_default
        assert client.admin.set_default_model("tiny", 2) == made  # again: the same
        with client.session("The") as new:
            assert new.model_version == "2"
        retiring = client.admin.unload_model("tiny", 1)
        assert retiring.retiring and retiring.sessions == 1  # its session keeps it
        assert client.admin.unload_model("tiny", 1) == retiring  # again: still retiring, nothing more
        assert old.step("q").position == 4
        with pytest.raises(ModelRetiring):
            client.session(model_version=1)
        with pytest.raises(ModelRetiring):
            client.admin.set_default_model("tiny", 1)
        old.close()
        wait_for(lambda: [model.version for model in client.models()] == ["2"])  # its last session ended
        with pytest.raises(ModelNotFound):
            client.admin.unload_model("tiny", 1)  # a resent unload whose first try landed would answer this
    with Client(running.address, token=USER_TOKEN) as user:
        assert [model.version for model in user.models()] == ["2"]
        with pytest.raises(Unauthenticated):
            user.admin.set_default_model("tiny", 2)  # a caller's token opens no Admin call
    with Client(running.address, token=ADMIN_TOKEN) as operator:
        assert operator.admin.set_default_model("tiny", 2).default_version  # admin_token defaults to token
        with pytest.raises(Unauthenticated):
            operator.models()  # and an admin token opens nothing else


def test_the_async_client_loads_and_switches_versions_where_only_admin_takes_tokens(with_admin_tokens):
    running = with_admin_tokens(admin_only=True)

    async def scenario() -> None:
        async with AsyncClient(running.address, admin_token=ADMIN_TOKEN) as client:
            loaded = await client.admin.load_model("tiny", 2, make_default=True)
            assert loaded.default_version and loaded.is_default
            async with client.session("The") as session:
                assert session.model_version == "2"
                assert (await session.info()).model_version == "2"
            assert (await client.admin.set_default_model("tiny", 1)).default_version
            assert [(m.version, m.default_version) for m in await client.models()] == [("1", True), ("2", False)]
            assert (await client.model("tiny", 2)).version == "2"
            assert (await client.admin.unload_model("tiny", 2)).sessions == 0
            assert [m.version for m in await client.models()] == ["1"]
        async with AsyncClient(running.address) as anonymous:
            assert len(await anonymous.states()) >= 0  # the Inference service is open
            with pytest.raises(Unauthenticated):
                await anonymous.admin.load_model("tiny", 2)

    asyncio.run(scenario())


def test_a_shared_state_from_either_client_serves_every_caller_and_only_admin_changes_it(with_admin_tokens):
    running = with_admin_tokens()
    with Client(running.address, token=USER_TOKEN, admin_token=ADMIN_TOKEN) as client:
        shared = client.admin.register_shared_state("house", "The quick")
        assert (shared.name, shared.source, shared.prompt_tokens) == ("house", "shared", 9)
        assert [(state.name, state.source) for state in client.states()] == [("house", "shared")]
        with client.session(" brown", initial_state="house") as session:
            assert session.info().initial_state == "house"
        with pytest.raises(StateIsShipped):
            client.delete_state("house")  # read-only to callers
        client.register_state("mine", "The lazy")
        assert [(state.name, state.source) for state in client.states()] == [("house", "shared"),
                                                                             ("mine", "registered")]
        with pytest.raises(StateNotFound):
            client.admin.delete_shared_state("mine")  # a caller's own state is no shared one

    async def scenario() -> None:
        async with AsyncClient(running.address, token=USER_TOKEN, admin_token=ADMIN_TOKEN) as client:
            assert (await client.admin.register_shared_state("house", "The dog")).prompt_tokens == 7  # replaced
            await client.admin.delete_shared_state("house")
            assert [state.name for state in await client.states()] == ["mine"]

    asyncio.run(scenario())


def test_admin_calls_wait_out_a_server_that_is_still_starting(bundle):
    """They are retried on UNAVAILABLE (each is safe to resend), unlike opening a session."""
    address = f"127.0.0.1:{free_port()}"
    command = [str(Path(sys.executable).with_name("rnnserve-server")), "--listen", address, "--bundle",
               str(bundle.path)]
    processes = []
    starter = threading.Timer(1.0, lambda: processes.append(subprocess.Popen(command)))
    with Client(address, retries=10, timeout=5) as client:
        try:
            starter.start()  # the call below goes out before the server even exists
            assert client.admin.set_default_model(bundle.name, bundle.version).default_version
        finally:
            starter.join()
            for process in processes:
                process.terminate()
                process.wait(10)


# rnnserve-client ------------------------------------------------------------------------------------------------

def cli(address: str, *args: str, check: bool = True, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    """The command, with the server's address (and `env`) in its environment as a user's shell would have it."""
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("RNNSERVE_")}
    environment = {**inherited, "RNNSERVE_ADDRESS": address, **env}
    done = subprocess.run([COMMAND, *args], input=stdin, capture_output=True, text=True, env=environment, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_cli_models_shows_versions_defaults_sessions_and_retiring(three_versions):
    address = three_versions.address
    session = cli(address, "sessions", "create", "--model", "tiny", "--model-version", "1").stdout.strip()
    assert json.loads(cli(address, "sessions", "get", session, "--json").stdout)["model_version"] == "1"
    assert "tiny version 1" in cli(address, "sessions", "get", session).stdout
    cli(address, "admin", "default", "tiny", "1")  # no tokens on this server: Admin is open like the rest
    cli(address, "admin", "unload", "tiny", "2")
    cli(address, "admin", "load", "tiny", "2")
    retiring = cli(address, "admin", "unload", "tiny", "1", check=False)
    assert retiring.returncode == 1 and "MODEL_IS_DEFAULT" in retiring.stderr  # still the default
    cli(address, "admin", "default", "tiny", "2")
    assert cli(address, "admin", "unload", "tiny", "1").stdout.strip() == \
        "tiny version 1 retires: it takes no new sessions and unloads once its 1 running ones end"
    table = cli(address, "models").stdout.splitlines()
    assert table[0].split() == ["name", "version", "cell", "layers", "hidden", "vocab", "sessions", "default",
                                "retiring"]
    rows = {tuple(row.split()[:2]): row.split()[2:] for row in table[1:]}
    assert rows["tiny", "1"][4:] == ["1", "yes"]  # one session, no default mark, retiring
    assert rows["tiny", "2"][4:] == ["0", "server"] and rows["other", "1"][4:] == ["0", "model"]
    listed = [json.loads(line) for line in cli(address, "models", "--json").stdout.splitlines()]
    assert [(m["version"], m["retiring"], m["sessions"]) for m in listed if m["name"] == "tiny"] == \
        [("1", True, 1), ("2", False, 0)]
    described = json.loads(cli(address, "models", "tiny", "1", "--json").stdout)
    assert (described["version"], described["default_version"]) == ("1", False)
    assert "retiring" in cli(address, "models", "tiny", "1").stdout


def test_cli_predict_and_states_on_a_named_version(three_versions):
    address = three_versions.address
    predictions = {version: json.loads(cli(address, "--json", "predict", "The q", "--model-version", version).stdout)
                   for version in ("1", "2")}
    assert predictions["1"]["candidates"][:3] != predictions["2"]["candidates"][:3]
    assert predictions["2"] == json.loads(cli(address, "--json", "predict", "The q").stdout)  # 2: the default
    cli(address, "states", "register", "intro", "The", "--model-version", "1")
    assert "intro" in cli(address, "states", "list", "--model", "tiny", "--model-version", "1").stdout
    assert "intro" not in cli(address, "states", "list").stdout
    typed = cli(address, "--json", "interactive", "--model-version", "1", stdin="The q\n").stdout
    assert json.loads(typed)["candidates"] == predictions["1"]["candidates"][:3]  # its top 3, on version 1
    missing = cli(address, "predict", "x", "--model-version", "9", check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "MODEL_NOT_FOUND" in missing.stderr
    too_long = cli(address, "sessions", "create", "--model-version", "9" * 1000, check=False)
    assert too_long.returncode == 1 and too_long.stderr.startswith("error: model_version: ")
    assert len(too_long.stderr.splitlines()) == 1 and "INVALID_ARGUMENT" in too_long.stderr


def test_cli_admin_takes_its_token_from_the_flag_or_its_environment_twin(with_admin_tokens):
    address = with_admin_tokens().address
    refused = cli(address, "admin", "load", "tiny", "2", "--token", USER_TOKEN, check=False)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr
    assert "--admin-token" in refused.stderr and "RNNSERVE_ADMIN_TOKEN" in refused.stderr
    loaded = cli(address, "admin", "load", "tiny", "2", "--default", "--admin-token", ADMIN_TOKEN)
    assert loaded.stdout.strip() == "loaded tiny version 2, the default of tiny"
    made = cli(address, "--json", "admin", "default", "tiny", "1", RNNSERVE_ADMIN_TOKEN=ADMIN_TOKEN)
    assert json.loads(made.stdout)["default_version"] is True
    assert cli(address, "admin", "--admin-token", ADMIN_TOKEN, "unload", "tiny", "2").stdout.strip() == \
        "unloaded tiny version 2"
    session = cli(address, "sessions", "create", "--token", USER_TOKEN).stdout.strip()
    assert json.loads(cli(address, "sessions", "get", session, "--json", "--token", USER_TOKEN).stdout)[
        "model_version"] == "1"
    shared = cli(address, "admin", "share", "house", "The quick", "--admin-token", ADMIN_TOKEN)
    assert shared.stdout.strip() == "shared house (9 tokens) with every caller"
    listed = cli(address, "states", "list", "--token", USER_TOKEN).stdout
    assert "house" in listed and "shared" in listed
    refused = cli(address, "admin", "unshare", "house", "--admin-token", USER_TOKEN, check=False)
    assert refused.returncode == 1 and "--admin-token" in refused.stderr
    assert cli(address, "admin", "unshare", "house", RNNSERVE_ADMIN_TOKEN=ADMIN_TOKEN).stdout.strip() == \
        "deleted the shared state house"


@pytest.mark.parametrize(("args", "says"), [
    (("admin", "load", "tiny", ""), "error: version: "),  # the server's refusal, naming the field
    (("admin", "unload", "nothing", "1"), "error: "),
    (("admin", "default", "tiny", "9", "--server"), "error: "),
])
def test_cli_admin_refusals_are_one_line(three_versions, args, says):
    refused = cli(three_versions.address, *args, check=False)
    assert refused.returncode == 1 and refused.stderr.startswith(says) and len(refused.stderr.splitlines()) == 1
    assert refused.stdout == ""


def test_cli_admin_usage_mistakes_get_a_usage_line(three_versions):
    refused = cli(three_versions.address, "admin", "load", "tiny", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines()[-1].startswith("rnnserve-client admin load: error:")
