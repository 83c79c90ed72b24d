"""The server as `make serve` starts it (no model flags) serves the shipped repository as a repository:
docs/MODELS.md's "Several models" example runs as shown, Admin loads its versions back, and polling the
installed package's directory changes nothing."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rnnserve.bundle import DEFAULT_MODEL, default_repository_path
from rnnserve.client import Client
from rnnserve.server.settings import Settings
from serving import end_process

ROOT = Path(__file__).resolve().parents[1]
SERVER = str(Path(sys.executable).with_name("rnnserve-server"))
CLIENT = str(Path(sys.executable).with_name("rnnserve-client"))
EXAMPLE_CALL = 'client.admin.load_model("shakespeare-lstm", 2, make_default=True)'


def _documented_blocks(language: str) -> Iterator[str]:
    """Every fenced block of `language` ("" for a bare fence) on the page about several models, fences paired
    in order (a closing fence is never read as the opening of a bare block)."""
    opened, lines = None, []
    for line in (ROOT / "docs" / "MODELS.md").read_text().splitlines():
        if opened is None and line.startswith("```"):
            opened, lines = line[3:].strip(), []
        elif opened is not None and line == "```":
            if opened == language:
                yield "\n".join(lines) + "\n"
            opened = None
        elif opened is not None:
            lines.append(line)


def several_models_example() -> tuple[str, list[str]]:
    """The Python example of the models and Admin calls, and the shell lines that follow it."""
    python = next(block for block in _documented_blocks("python") if EXAMPLE_CALL in block)
    shell = next(block for block in _documented_blocks("") if "$ rnnserve-client admin load" in block)
    return python, [line[2:].split("  #")[0] for line in shell.splitlines() if line.startswith("$ ")]


def default_model(client: Client) -> list:
    """The loaded versions of the default model (the shipped repository serves other models beside it)."""
    return [model for model in client.models() if model.name == DEFAULT_MODEL]


def _without_model_settings() -> dict[str, str]:
    """This environment less any RNNSERVE_* variable, as on a fresh shell: nothing names a model."""
    return {name: value for name, value in os.environ.items() if not name.startswith("RNNSERVE_")}


@contextlib.contextmanager
def make_serve(**environment: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`rnnserve-server --http-listen ...` as `make serve` runs it, on ephemeral ports: (address, process)."""
    process = subprocess.Popen([SERVER, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
                               env={**_without_model_settings(), **environment}, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not (port := re.search(r"serving on .*?, port (\d+)", lines[-1] if lines else "")):
            lines.append(process.stderr.readline())
            assert lines[-1], "the server ended before serving:\n" + "".join(lines)
        yield f"127.0.0.1:{port.group(1)}", process
    finally:
        end_process(process)


def _files(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(directory.rglob("*"))}


def test_the_several_models_example_runs_as_shown_under_make_serve():
    """The shell lines, then the Python example: its load_model brings back the version the shell unloaded."""
    python, shell = several_models_example()
    with make_serve() as (address, _):
        environment = {**_without_model_settings(), "RNNSERVE_ADDRESS": address, "ADMIN_TOKEN": "any-token"}
        for line in shell:
            done = subprocess.run(line.replace("rnnserve-client", CLIENT, 1), shell=True, env=environment,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{line}: {done.stderr}"
        with Client(address) as client:  # the last line unloaded version 2, the model's default now 1
            assert [(m.version, m.default_version, m.is_default) for m in default_model(client)] == [("1", True, True)]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(python.replace("127.0.0.1:50051", address), {})  # noqa: S102  (the documented example, as shown)
        lines = printed.getvalue().splitlines()
        listed = [line.split()[:2] for line in lines[:-1]]  # every loaded version: the shipped models' and what
        assert [version for name, version in listed if name == DEFAULT_MODEL] == ["1"]  # the shell left of ours
        assert lines[-1] == "1"  # the session ran version 1, which then retired and unloaded
        with Client(address) as client:
            assert [(m.version, m.default_version) for m in default_model(client)] == [("2", True)]


def test_an_unloaded_shipped_version_loads_again_and_the_poll_changes_nothing():
    before = _files(default_repository_path())
    with make_serve(RNNSERVE_MODEL_POLL_SECONDS="0.05") as (address, process):
        environment = {**_without_model_settings(), "RNNSERVE_ADDRESS": address}

        def cli(*args: str) -> str:
            done = subprocess.run([CLIENT, *args], env=environment, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        assert cli("admin", "load", DEFAULT_MODEL, "1") == f"loaded {DEFAULT_MODEL} version 1, the default of " \
                                                           f"{DEFAULT_MODEL}"  # loaded already: answered as it is
        assert cli("admin", "unload", DEFAULT_MODEL, "2") == f"unloaded {DEFAULT_MODEL} version 2"
        with Client(address) as client:
            for _ in range(20):  # a second's polls: none loads back what Admin unloaded
                assert [m.version for m in default_model(client)] == ["1"]
                client.health()
        assert cli("admin", "load", DEFAULT_MODEL, "2") == f"loaded {DEFAULT_MODEL} version 2"
        with Client(address) as client:
            assert [m.version for m in default_model(client)] == ["1", "2"]
            with client.session("To be", model=DEFAULT_MODEL, model_version=2) as session:
                assert session.model_version == "2" and session.position == 5
        end_process(process)
        log = process.stderr.read()
    assert " ERROR " not in log and "WARNING" not in log, log
    assert _files(default_repository_path()) == before  # polling reads the package's directory, never writes it


def test_a_bundle_served_alone_says_why_admin_cannot_load():
    bundle = default_repository_path() / DEFAULT_MODEL / "1"
    process = subprocess.Popen([SERVER, "--listen", "127.0.0.1:0", "--bundle", str(bundle)],
                               env=_without_model_settings(), stderr=subprocess.PIPE, text=True)
    try:
        port = re.search(r"port (\d+)", process.stderr.readline()).group(1)
        done = subprocess.run([CLIENT, "admin", "load", DEFAULT_MODEL, "2"], capture_output=True, text=True,
                              env={**_without_model_settings(), "RNNSERVE_ADDRESS": f"127.0.0.1:{port}"}, timeout=60)
        assert done.returncode == 1 and "serves one bundle alone (--bundle)" in done.stderr
    finally:
        end_process(process)


def test_default_model_chooses_in_the_shipped_repository_and_not_beside_a_bundle():
    assert Settings(default_model=DEFAULT_MODEL).default_model == DEFAULT_MODEL
    with pytest.raises(ValueError, match="not with a bundle served alone"):
        Settings(default_model=DEFAULT_MODEL, bundle=default_repository_path() / DEFAULT_MODEL / "1")
