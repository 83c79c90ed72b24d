"""What `pip install .` puts in a wheel (the Dockerfile's install): the one `rnnserve` namespace with the
shipped models and the playground inside, built by the locked setuptools without a warning."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[zipfile.ZipFile, str]:
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "PYTHONWARNINGS": ""}  # as a user's shell has it: every warning shows
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, ROOT],
                           capture_output=True, text=True, env=env, check=True)
    (wheel,) = out.glob("rnnserve-*.whl")
    return zipfile.ZipFile(wheel), built.stdout + built.stderr


def test_the_wheel_builds_without_warnings(build):
    _, output = build
    assert "Warning" not in output, output


def test_the_wheel_holds_one_namespace_with_its_data(build):
    wheel, _ = build
    names = wheel.namelist()
    assert {name.split("/")[0] for name in names if not name.startswith("rnnserve-")} == {"rnnserve"}
    shipped = [path.relative_to(ROOT).as_posix() for path in (ROOT / "rnnserve" / "models").rglob("*") if path.is_file()]
    assert shipped and set(shipped) <= set(names)
    assert {"index.html", "playground.js", "playground.css"} <= {
        Path(name).name for name in names if name.startswith("rnnserve/server/faces/web/static/")}
