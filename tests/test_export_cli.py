"""The README's training and export commands, run as a user runs them: installed entry points."""

import json
import subprocess
import sys
from pathlib import Path

from rnnserve.bundle import load_bundle

BIN = Path(sys.executable).parent


def run(command: str, *args: str) -> str:
    result = subprocess.run([str(BIN / command), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_tiny_preset_trains_exports_and_loads(tmp_path: Path):
    """`rnnserve-train --preset tiny` then `rnnserve-export` on the default corpus: a servable bundle."""
    run("rnnserve-train", "--preset", "tiny", "--out", str(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoint.pt").exists() and (tmp_path / "run" / "loss.png").exists()
    out = run("rnnserve-export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "bundle"), "--no-baseline")
    assert "val" in out and "parity" in out
    bundle = load_bundle(tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert bundle.cell == "gru" and manifest["training"]["command"] == "rnnserve-train --preset tiny"
    assert manifest["corpus"]["validation_files"] == ["henry_v_gut.txt", "macbeth_gut.txt",
                                                      "rape_of_lucrece_gut.txt", "twelfth_night_gut.txt"]


def test_help_explains_presets_and_flags():
    train_help = run("rnnserve-train", "--help")
    assert "--preset" in train_help and "--budget-minutes" in train_help and "--resume" in train_help
    assert "--compare" in run("rnnserve-export", "--help")
