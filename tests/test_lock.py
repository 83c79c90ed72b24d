"""The environment the tests run in is the lock's: what CI passes is what a new machine installs.

`make test` installs requirements/dev.lock with hashes; a package at another version (installed by hand, or
by a plain `pip install -e .[dev]` on another day) would let the suite pass here and fail for a user, as the
committed stubs once did when grpcio-tools moved from 1.85.1 to 1.85.4 under an unpinned install.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements"
PIN = re.compile(r"^(?P<requirement>[A-Za-z0-9][^\s\\]*==[^\s\\]+(?:\s*;[^\\]+)?)")


def locked(lock: str) -> dict[str, str]:
    """Name -> version of every pin in a lock that applies to this platform."""
    pins = {}
    for line in (REQUIREMENTS / lock).read_text().splitlines():
        if match := PIN.match(line):
            requirement = Requirement(match["requirement"])
            if requirement.marker is None or requirement.marker.evaluate():
                pins[requirement.name] = str(requirement.specifier).removeprefix("==")
    return pins


def test_every_installed_dependency_is_at_its_locked_version():
    pins = locked("dev.lock")
    assert {"grpcio-tools", "grpcio", "protobuf", "onnxruntime", "torch"} <= pins.keys()
    drifted = {name: (metadata.version(name), version) for name, version in pins.items()
               if metadata.version(name) != version}
    assert not drifted, f"installed (not the lock's) versions: {drifted}; install with `make test` or see docs/INSTALL.md"


def test_serving_takes_the_versions_the_tests_ran_with():
    serving, dev = locked("serving.lock"), locked("dev.lock")
    assert {"onnxruntime", "grpcio", "protobuf", "numpy"} <= serving.keys()
    assert "torch" not in serving  # serving never needs it
    assert {name: version for name, version in serving.items() if dev.get(name) != version} == {}


@pytest.mark.parametrize("lock", ["dev.lock", "serving.lock"])
def test_every_pin_carries_hashes(lock):
    text = (REQUIREMENTS / lock).read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n\n", 1)[-1].strip())
    unhashed = [entry.split()[0] for entry in entries if PIN.match(entry) and "--hash=sha256:" not in entry]
    assert entries and not unhashed
