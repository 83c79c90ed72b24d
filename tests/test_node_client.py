"""A Node client loads the .proto with proto/ as its only include directory and talks to a real server.

Non-Python clients cannot import google/rpc/status.proto from a Python package, so proto/ ships it
(and error_details.proto, to read the details of errors) beside rnnserve/v1. The client is
tests/node/client.js on @grpc/grpc-js and @grpc/proto-loader, pinned by its package-lock.json and
installed here with `npm ci` from the npm registry into tests/node/node_modules (git ignores it).
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"

pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                reason="node or npm is missing: install Debian's nodejs and npm (make system-packages)")


@pytest.fixture(scope="module")
def node_client() -> Path:
    """client.js with its pinned packages installed (their install scripts are not needed, so not run)."""
    subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True,
                   capture_output=True, timeout=300)
    return NODE_DIR / "client.js"


def test_a_node_client_loads_the_proto_calls_the_server_and_reads_error_details(node_client, start_server):
    running = start_server()
    done = subprocess.run(["node", str(node_client), running.address], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["models"] == [running.model.name]
    assert seen["created"] == 3 and seen["step"]["position"] == 5 and len(seen["step"]["token_ids"]) == 3
    assert seen["not_found"]["code"] == 5  # NOT_FOUND
    assert seen["not_found"]["details"][0] == {"type": "google.rpc.ErrorInfo", "reason": "SESSION_NOT_FOUND",
                                               "domain": "rnnserve", "metadata": {"session_id": "no-such-session"}}
    assert seen["repeated"]["code"] == 3  # INVALID_ARGUMENT, the whole StepBatch refused
    violations = [d for d in seen["repeated"]["details"] if d["type"] == "google.rpc.BadRequest"]
    assert violations[0]["field_violations"][0]["field"] == "steps[1].session_id"
    assert seen["after"] == 5  # the refused StepBatch changed nothing
