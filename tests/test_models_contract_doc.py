"""docs/MODELS-CONTRACT.md's example, run as written: a module exported, served from a repository, generated from."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from serving import RunningServer
from tiny_models import tiny_corpus, train_tokenizer

from rnnserve.server.settings import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "MODELS-CONTRACT.md"
CLIENT = str(Path(sys.executable).with_name("rnnserve-client"))


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def test_the_serving_your_own_model_example_serves_a_session(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text(train_tokenizer(tiny_corpus()))
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks("python")[0], str(DOC), "exec"), {"__name__": "doc_example"})
    manifest = json.loads((tmp_path / "models" / "words" / "1" / "manifest.json").read_text())
    assert manifest["vocabulary"]["kind"] == "tokenizer" and manifest["state"][0]["shape"] == ["batch", 2, 64]

    server_command, client_command = blocks("bash")[0].strip().splitlines()
    assert server_command == "rnnserve-server --model-repository models --default-model words"
    running = RunningServer(None, Settings(listen="127.0.0.1:0", model_repository=str(tmp_path / "models"),
                                           default_model="words", model_poll_seconds=0))
    try:
        program, *arguments = shlex.split(client_command)
        assert program == "rnnserve-client" and arguments[-2] == "--max-tokens"
        done = subprocess.run([CLIENT, "--json", *arguments], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "RNNSERVE_ADDRESS": running.address})
        assert done.returncode == 0, done.stderr
        generated = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(generated) == int(arguments[-1]) and generated[-1]["finish_reason"] == "length"
    finally:
        running.stop()
