"""`rnnserve-client` as a user runs it: the installed command, in a subprocess, against the real server."""

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving import free_port

COMMAND = str(Path(sys.executable).with_name("rnnserve-client"))


@pytest.fixture
def address(shared_server):
    return shared_server.address


@pytest.fixture
def cli(address):
    """Run the command with the server's address in RNNSERVE_ADDRESS, as a user's shell would have it."""
    def run(*args: str, stdin: str = "", check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "RNNSERVE_ADDRESS": address}
        done = subprocess.run([COMMAND, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60)
        if check:
            assert done.returncode == 0, done.stderr
        return done
    return run


def test_predict_prints_a_table_and_json(cli):
    table = cli("predict", "the king", "--top-k", "3").stdout.splitlines()
    assert table[0].split() == ["rank", "token", "probability", "logprob", "id"] and len(table) == 4
    answer = json.loads(cli("--json", "predict", "the king", "--top-k", "3").stdout)
    assert answer["position"] == 8 and len(answer["candidates"]) == 3
    assert [c["id"] for c in answer["candidates"]] == [int(row.split()[-1]) for row in table[1:]]


def test_generate_streams_a_reproducible_continuation(cli):
    args = ("generate", "the king", "--max-tokens", "15", "--temperature", "1", "--seed", "4")
    text = cli(*args).stdout
    assert text == cli(*args).stdout and text.startswith("the king") and len(text) == 8 + 15 + 1  # and a line break
    tokens = [json.loads(line) for line in cli("--json", *args).stdout.splitlines()]
    assert "the king" + "".join(t["text"] for t in tokens) + "\n" == text
    assert tokens[-1]["finish_reason"] == "length" and tokens[-1]["position"] == 8 + 15


def test_a_reader_that_stops_early_ends_generate_quietly(address):
    env = {**os.environ, "RNNSERVE_ADDRESS": address}
    reader = subprocess.Popen(["head", "-c", "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    done = subprocess.run([COMMAND, "generate", "the king", "--max-tokens", "3000"], stdout=reader.stdin,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=60)
    reader.stdin.close()
    assert reader.stdout.read() == b"the" and reader.wait(10) == 0
    assert done.returncode == 128 + signal.SIGPIPE and done.stderr == ""  # no traceback


def test_sessions_create_get_predict_close(cli):
    session_id = cli("sessions", "create", "--prompt", "the").stdout.strip()
    assert json.loads(cli("sessions", "get", session_id, "--json").stdout)["position"] == 3
    assert json.loads(cli("predict", " king", "--session", session_id, "--json").stdout)["position"] == 8
    assert "position     8" in cli("sessions", "get", session_id).stdout
    assert cli("sessions", "close", session_id).stdout.strip() == f"closed {session_id}"
    gone = cli("sessions", "close", session_id, check=False)
    assert gone.returncode == 1 and "SESSION_NOT_FOUND" in gone.stderr


def test_models_and_health(cli, bundle):
    assert bundle.name in cli("models").stdout
    assert json.loads(cli("models", "--json").stdout)["name"] == bundle.name
    assert json.loads(cli("models", bundle.name, "--json").stdout)["vocab_size"] == len(bundle.vocab)
    assert cli("health").stdout.strip() == "SERVING"
    assert json.loads(cli("--json", "health").stdout) == {"status": "SERVING"}


def test_errors_name_the_field_and_exit_nonzero(cli):
    refused = cli("predict", "the", "--top-k", "1000000", check=False)
    assert refused.returncode == 1
    assert "INVALID_ARGUMENT" in refused.stderr and "top_k" in refused.stderr


def test_unreachable_server_gets_a_hint(cli):
    address = f"127.0.0.1:{free_port()}"
    down = cli("--address", address, "--retries", "0", "health", check=False)
    assert down.returncode == 1 and f"is a server running at {address}?" in down.stderr


def test_interactive_with_piped_lines(cli):
    lines = cli("interactive", stdin="the\nking\n").stdout.splitlines()
    assert [line.split("  →  ")[0] for line in lines] == ["'the'", "'the\\nking'"]
    answers = [json.loads(line) for line in cli("interactive", "--json", stdin="the\nking\n").stdout.splitlines()]
    assert [a["position"] for a in answers] == [3, 8]


def _read_until(fd: int, needle: bytes, seconds: float = 20) -> bytes:
    seen, deadline = b"", time.monotonic() + seconds
    while needle not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            seen += os.read(fd, 4096)
    assert needle in seen, seen
    return seen


def _exit_status(pid: int, seconds: float = 20) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    return None


def _where_it_hangs(pid: int, terminal: int) -> str:
    """What a client that did not exit printed, ending with its threads' stacks (faulthandler on SIGABRT)."""
    os.kill(pid, signal.SIGABRT)
    printed = b""
    while select.select([terminal], [], [], 2)[0]:
        try:
            printed += os.read(terminal, 65536)
        except OSError:  # the terminal closed with the client
            break
    return "still running after the quit key; what it printed, its stacks last:\n" + printed.decode(errors="replace")


@pytest.mark.parametrize("quit_key", [b"\x04", b"\x03"], ids=["ctrl-d", "ctrl-c"])
def test_interactive_on_a_terminal_redraws_each_key(address, quit_key):
    # pty.fork makes the terminal the child's controlling terminal, so Ctrl-C sends it SIGINT.
    pid, main = pty.fork()
    if pid == 0:
        try:
            # Started from a background job or nohup, as CI may be, a program inherits SIGINT ignored:
            # Ctrl-C must quit the interactive client all the same.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # faulthandler: a SIGABRT makes a hung client print where each of its threads is
            os.execve(COMMAND, [COMMAND, "interactive"],
                      {**os.environ, "RNNSERVE_ADDRESS": address, "PYTHONFAULTHANDLER": "1"})
        finally:
            os._exit(127)
    status = None
    try:
        _read_until(main, b"Ctrl-D")
        for key, shown in ((b"t", "t"), (b"h", "th"), (b"x", "thx"), (b"\x7f", "th"), (b"\r", "th⏎")):
            os.write(main, key)
            _read_until(main, f"\x1b[K{shown}  →  '".encode())  # the line redrawn, predictions after the arrow
        os.write(main, quit_key)
        status = _exit_status(pid)
        assert status == 0, _where_it_hangs(pid, main) if status is None else status
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(main)


def test_sessions_fork_reset_and_rewind(cli):
    source = cli("sessions", "create", "--prompt", "the king").stdout.strip()
    forks = cli("sessions", "fork", source, "--count", "2").stdout.split()
    assert len(forks) == 2 and source not in forks
    assert [json.loads(cli("sessions", "get", fork, "--json").stdout)["position"] for fork in forks] == [8, 8]
    twins = [json.loads(cli("predict", " a", "--session", session, "--json").stdout) for session in (source, *forks)]
    assert all(twin == twins[0] for twin in twins)  # forks predict as their source
    rewound = json.loads(cli("--json", "sessions", "rewind", source, "2").stdout)
    fresh = json.loads(cli("--json", "predict", "the king").stdout)
    assert rewound["position"] == 8  # " a" undone
    assert [c["id"] for c in rewound["candidates"]] == [c["id"] for c in fresh["candidates"]]
    assert "nothing predicted" in cli("sessions", "rewind", source, "8").stdout  # back at position 0 of zeros
    assert cli("sessions", "reset", forks[0]).stdout.strip() == f"reset {forks[0]} to position 0"
    shown = cli("sessions", "get", forks[0]).stdout.splitlines()
    details = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in shown)
    assert (details["position"], details["rewindable"], details["starts from"]) == ("0", "0", "zeros")


def test_score_and_peek_leave_the_session_where_it_is(cli):
    session = cli("sessions", "create", "--prompt", "the king").stdout.strip()
    table = cli("score", session, " and", "x").stdout.splitlines()
    assert table[0].split()[:3] == ["logprob", "per", "token"] and table[1].endswith("' and'") and len(table) == 3
    scores = [json.loads(line) for line in cli("--json", "score", session, " and", "x").stdout.splitlines()]
    assert [len(score["logprobs"]) for score in scores] == [4, 1]
    peeked = json.loads(cli("--json", "peek", session, " a", "--top-k", "3").stdout)
    assert peeked["position"] == 10 and len(peeked["candidates"]) == 3
    assert json.loads(cli("sessions", "get", session, "--json").stdout)["position"] == 8
    assert json.loads(cli("--json", "predict", " a", "--top-k", "3", "--session", session).stdout) == peeked


def test_sessions_export_and_import_continue_identically(cli, tmp_path):
    session = cli("sessions", "create", "--prompt", "the king").stdout.strip()
    blob = tmp_path / "session.bin"
    assert cli("sessions", "export", session, "--out", str(blob)).stdout.startswith(f"exported {session} at position 8")
    copy = cli("sessions", "import", str(blob)).stdout.strip()
    assert copy != session
    answers = [json.loads(cli("--json", "predict", " a", "--session", s).stdout) for s in (session, copy)]
    assert answers[0] == answers[1]


def test_states_register_list_start_and_delete(cli):
    assert json.loads(cli("--json", "states", "register", "cli-king", "the king").stdout)["prompt_tokens"] == 8
    listed = cli("states", "list").stdout.splitlines()
    assert listed[0].split() == ["name", "source", "tokens", "prompt"]
    assert any(row.split()[:3] == ["cli-king", "registered", "8"] for row in listed[1:])
    session = cli("sessions", "create", "--initial-state", "cli-king").stdout.strip()
    assert json.loads(cli("sessions", "get", session, "--json").stdout)["initial_state"] == "cli-king"
    assert cli("states", "delete", "cli-king").stdout.strip() == "deleted cli-king"
    gone = cli("states", "delete", "cli-king", check=False)
    assert gone.returncode == 1 and "STATE_NOT_FOUND" in gone.stderr and "Traceback" not in gone.stderr


@pytest.mark.parametrize("args", [("sessions", "fork", "x", "--count", "0"), ("sessions", "rewind", "x", "-1"),
                                  ("sessions", "import", "/no/such/file"), ("peek", "x", "a", "--top-k", "many")])
def test_bad_values_get_one_line_not_a_traceback(cli, args):
    refused = cli(*args, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines()[-1].startswith(f"rnnserve-client {args[0]}")


def test_rewinding_too_far_and_exporting_to_an_unwritable_file_say_why(cli, tmp_path):
    session = cli("sessions", "create", "--prompt", "the king").stdout.strip()
    too_far = cli("sessions", "rewind", session, "9", check=False)
    assert too_far.returncode == 1 and "REWIND_BEYOND_DEPTH" in too_far.stderr and "Traceback" not in too_far.stderr
    unwritable = cli("sessions", "export", session, "--out", str(tmp_path / "no" / "such" / "dir"), check=False)
    assert unwritable.returncode == 1 and unwritable.stderr.startswith("error: cannot write")


@pytest.mark.parametrize(("args", "field"), [
    (("predict", "To be", "--top-k", "99999999999"), "top_k"),
    (("generate", "To", "--max-tokens", "-5"), "max_tokens"),
    (("generate", "To", "--max-tokens", "99999999999"), "max_tokens"),
    (("generate", "To", "--seed", "-1"), "seed"),
    (("generate", "To", "--top-k", "-2"), "top_k"),
    (("generate", "To", "--top-p", "nan"), "top_p"),
    (("sessions", "create", "--ttl", "99999999999"), "ttl_seconds"),
    (("predict", "To", "--temperature", "nan"), "temperature"),
])
def test_values_no_wire_field_can_hold_are_refused_naming_the_field(cli, args, field):
    """Out of a field's wire range (checked in the client) or of the server's (checked there): one line, no
    traceback, and generate prints nothing of its prompt before the refusal."""
    refused = cli(*args, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith(f"error: {field}: ") and "INVALID_ARGUMENT" in refused.stderr
    assert refused.stdout == ""


def test_range_errors_agree_whatever_the_value(cli, bundle):
    """One message per field, the field's real range, for a value one past it or one no wire field holds."""
    vocab = len(bundle.vocab)
    top_k = {cli("predict", "To be", "--top-k", value, check=False).stderr for value in (str(vocab + 1), "-1",
                                                                                          "99999999999")}
    assert top_k == {f"error: top_k: must be in [1, {vocab}], the vocabulary size (0 means 5) "
                     f"(INVALID_ARGUMENT)\n"}
    max_tokens = {cli("generate", "To", "--max-tokens", value, check=False).stderr for value in ("0", "-5", "4097",
                                                                                                 "99999999999")}
    assert len(max_tokens) == 1 and "max_tokens: must be in [1, 4096]" in max_tokens.pop()


def test_an_empty_prompt_is_named_as_the_text_given(cli):
    for args in (("predict", ""), ("generate", "")):
        refused = cli(*args, check=False)
        assert refused.returncode == 1 and refused.stderr.startswith("error: text: "), refused.stderr


def run_bytes(address: str, *args: bytes, stdin: bytes = b"", **environment: str) -> subprocess.CompletedProcess:
    """The command with arguments as raw bytes, as a shell passes $'...' to it."""
    return subprocess.run([COMMAND.encode(), *args], input=stdin, capture_output=True, timeout=60,
                          env={**os.environ, "RNNSERVE_ADDRESS": address, **environment})


@pytest.mark.parametrize("args", [(b"predict", b"To be\xff\xfe"), (b"generate", b"To be\xff\xfe"),
                                  (b"sessions", b"create", b"--prompt", b"To be\xff\xfe"),
                                  (b"score", b"SID", b"me", b"To be\xff\xfe"), (b"peek", b"SID", b"To be\xff\xfe"),
                                  (b"states", b"register", b"name", b"To be\xff\xfe")])
def test_a_prompt_that_is_not_utf8_gets_one_line_naming_the_byte(address, args):
    refused = run_bytes(address, *args)
    stderr = refused.stderr.decode()
    assert refused.returncode == 2 and "Traceback" not in stderr and refused.stdout == b""
    assert stderr.splitlines()[-1].endswith("the text is not UTF-8: byte 0xff at offset 5 (invalid start byte); "
                                            "convert it first, e.g. with `iconv -f latin1 -t utf-8`")


def test_a_prompt_from_a_file_or_standard_input(cli, address, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the king\nthe quick brown fox ", encoding="utf-8")
    length = len(prompt.read_text())
    assert json.loads(cli("predict", "--prompt-file", str(prompt), "--json").stdout)["position"] == length
    assert json.loads(cli("predict", "-", "--json", stdin=prompt.read_text()).stdout)["position"] == length
    assert json.loads(cli("predict", "--prompt-file", "-", "--json", stdin="the").stdout)["position"] == 3
    generated = cli("generate", "--prompt-file", str(prompt), "--max-tokens", "4").stdout
    assert generated.startswith(prompt.read_text()) and len(generated) == length + 4 + 1
    session = cli("sessions", "create", "--prompt", "-", stdin="the king").stdout.strip()
    assert json.loads(cli("sessions", "get", session, "--json").stdout)["position"] == 8
    assert json.loads(cli("peek", session, "--prompt-file", str(prompt), "--json").stdout)["position"] == 8 + length
    both = cli("predict", "the", "--prompt-file", str(prompt), check=False)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    missing = cli("predict", "--prompt-file", str(tmp_path / "none"), check=False)
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "No such file" in missing.stderr
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("the café".encode("latin-1"))
    refused = cli("predict", "--prompt-file", str(latin1), check=False)
    assert refused.returncode == 2 and f"{str(latin1)!r} is not UTF-8: byte 0xe9 at offset 7" in refused.stderr
    refused = run_bytes(address, b"predict", b"-", stdin=b"the caf\xe9")
    assert refused.returncode == 2 and b"standard input is not UTF-8: byte 0xe9 at offset 7" in refused.stderr


def test_unknown_characters_are_counted_and_noted(cli):
    answer = cli("--json", "predict", "Zoë the fox")
    assert json.loads(answer.stdout)["unknown_characters"] == 2
    assert answer.stderr == ("note: 2 characters of the text are not in the model's vocabulary and were read as the "
                             "unknown token\n")
    assert cli("predict", "the fox").stderr == ""
    generated = cli("generate", "Zebra", "--max-tokens", "2")
    assert "1 character of the prompt is not in the model's vocabulary and was read" in generated.stderr


@pytest.mark.parametrize(("errors", "said"), [
    ("strict", "error: standard input is not UTF-8: byte 0xe9 (invalid continuation byte)"),
    ("surrogateescape", "error: text: not UTF-8 text: character 8 is a lone surrogate ('\\udce9')")])
def test_interactive_input_that_is_not_utf8_ends_in_one_line(address, errors, said):
    """Python reads standard input with either error handler, by locale: each ends in one line."""
    refused = run_bytes(address, b"interactive", stdin=b"the king\nthe caf\xe9\n", PYTHONIOENCODING=f"utf-8:{errors}")
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
    assert refused.stderr.decode().startswith(said)
