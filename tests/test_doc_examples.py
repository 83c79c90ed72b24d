"""README's quickstart, run as a newcomer runs it beside `make serve`: every `$ ` command of its shell
blocks in one bash (so `SID=$(...)` carries to the next line) and every Python block, against a server of
the shipped repository with HTTP on, each address the README names pointed at that server's ports; and
each Python example of docs/ that shows what it prints (after a line "prints"), compared with what it does.

A command's output shown in the README must be what it prints: words exactly, printed decimals to one unit
of their last digit (the float model's sums round differently on other CPUs' instruction sets).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LOOPBACK
from rnnserve.server.settings import Settings
from serving import RunningServer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
# Commands a test cannot run as written: a full-screen loop that waits for keys (tests/test_client_cli.py
# drives it on a terminal of its own).
NOT_RUN = ("rnnserve-client interactive",)
MARK = "::readme-command::"


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order."""
    return [(lang, body) for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def shell_commands(body: str) -> list[tuple[str, list[str]]]:
    """(command, the output lines shown under it) of each `$ ` line of a shell block."""
    commands: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands:
            commands[-1][1].append(line)
    return commands


def same_output(shown: list[str], printed: list[str]) -> bool:
    """Word by word; a word with a decimal point may differ by one unit of its last printed digit."""
    if len(shown) != len(printed):
        return False
    for shown_line, printed_line in zip(shown, printed):
        shown_words, printed_words = shown_line.split(), printed_line.split()
        if len(shown_words) != len(printed_words):
            return False
        for want, got in zip(shown_words, printed_words):
            decimal = re.fullmatch(r"(-?\d+\.(\d+))%?", want)
            if decimal and re.fullmatch(r"-?\d+\.\d+%?", got):
                unit = 10.0 ** -len(decimal.group(2))
                if abs(float(want.rstrip("%")) - float(got.rstrip("%"))) > unit * 1.01:
                    return False
            elif want != got:
                return False
    return True


@pytest.fixture(scope="module")
def served():
    """What `make serve` serves: the shipped repository, gRPC and HTTP (here on ephemeral ports)."""
    running = RunningServer(None, Settings(**LOOPBACK, http_listen="127.0.0.1:0"))
    yield running
    running.stop()


def pointed_at(text: str, served: RunningServer) -> str:
    """`text` with the README's addresses replaced by the test server's."""
    return (text.replace("127.0.0.1:50051", served.address)
            .replace("localhost:8080", f"127.0.0.1:{served.server.http_port}")
            .replace("127.0.0.1:8080", f"127.0.0.1:{served.server.http_port}"))


def run_shell(commands: list[str], served: RunningServer) -> list[list[str]]:
    """Run `commands` in one bash, in order; each one's output lines. Stops at the first that fails."""
    script = "set -e\n" + "".join(f"echo '{MARK}'\n{pointed_at(command, served)}\n" for command in commands)
    env = {**os.environ, "RNNSERVE_ADDRESS": served.address, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return [chunk.splitlines() for chunk in done.stdout.split(MARK + "\n")[1:]]


def run_python(code: str, served: RunningServer) -> list[str]:
    """Run `code` as a script of its own; the lines it printed."""
    done = subprocess.run([sys.executable, "-c", pointed_at(code, served)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


SHELL_BLOCKS = [body for lang, body in fenced_blocks(README.read_text())
                if any(line.startswith("$ ") for line in body.splitlines())]
PYTHON_BLOCKS = [body for lang, body in fenced_blocks(README.read_text()) if lang == "python"]
PRINTING_EXAMPLES = [(page.name, code, shown) for page in sorted((ROOT / "docs").glob("*.md"))
                     for code, shown in re.findall(r"^```python\n(.*?)^```\n\nprints\n\n```\n(.*?)^```",
                                                   page.read_text(), re.S | re.M)]


def test_the_examples_are_found():
    """The parsing below finds what it is meant to run: the CLI, curl and Python examples."""
    commands = [command for body in SHELL_BLOCKS for command, _ in shell_commands(body)]
    assert any(c.startswith("rnnserve-client predict") for c in commands)
    assert any(c.startswith("curl ") for c in commands)
    assert PYTHON_BLOCKS and "SESSIONS.md" in [page for page, _, _ in PRINTING_EXAMPLES]


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[f"shell-{i}" for i in range(len(SHELL_BLOCKS))])
def test_the_readmes_shell_examples_print_what_it_shows(block, served):
    commands = [(command, shown) for command, shown in shell_commands(block) if not command.startswith(NOT_RUN)]
    printed = run_shell([command for command, _ in commands], served)
    for (command, shown), output in zip(commands, printed, strict=True):
        if shown:
            assert same_output(shown, output), f"$ {command}\nshown:\n" + "\n".join(shown) + \
                "\nprinted:\n" + "\n".join(output)
        if command.startswith("curl "):  # the README shows no output for these: each must be an answer, no error
            assert output and '"error"' not in output[0], f"$ {command}\n{output}"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"python-{i}" for i in range(len(PYTHON_BLOCKS))])
def test_the_readmes_python_examples_run(block, served):
    run_python(block, served)


@pytest.mark.parametrize(("page", "code", "shown"), PRINTING_EXAMPLES,
                         ids=[page for page, _, _ in PRINTING_EXAMPLES])
def test_the_docs_python_examples_print_what_they_show(page, code, shown, served):
    printed = run_python(code, served)
    assert same_output(shown.splitlines(), printed), "\n".join(printed)


@pytest.mark.parametrize(("shown", "printed", "same"), [
    (["   1  'e'  81.84%  -0.200  61"], ["   1  'e'  81.85%  -0.201  61"], True),
    (["   1  'e'  81.84%  -0.200  61"], ["   1  'e'  81.86%  -0.200  61"], False),
    (["   1  'e'  81.84%  -0.200  61"], ["   1  'e'  81.84%  -0.200  62"], False),
    (["   1  'e'  81.84%  -0.200  61"], ["   1  'r'  81.84%  -0.200  61"], False),
    (["Now is the winter"], ["Now is the winter", "of"], False),
])
def test_shown_output_is_compared_word_by_word(shown, printed, same):
    assert same_output(shown, printed) == same
