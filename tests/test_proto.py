"""The committed stubs are exactly what `python proto/generate.py` makes from the .proto."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUB_DIR = ROOT / "proto" / "rnnserve" / "v1"


def load_generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto(tmp_path: Path):
    load_generator().generate(tmp_path)
    fresh = sorted((tmp_path / "rnnserve" / "v1").glob("*_pb2*.py*"))
    assert [p.name for p in fresh] == ["rnnserve_pb2.py", "rnnserve_pb2.pyi", "rnnserve_pb2_grpc.py"]
    for generated in fresh:
        committed = STUB_DIR / generated.name
        assert committed.read_text() == generated.read_text(), f"{committed} is stale: run `python proto/generate.py`"


DECLARATION = re.compile(r"^\s*(rpc |message |enum |(repeated |optional )?[\w.<>, ]+ \w+ = \d+;)")


def test_every_rpc_message_and_field_is_documented():
    """Each declaration has a comment on the line before it or at the end of its own line."""
    lines = (STUB_DIR / "rnnserve.proto").read_text().splitlines()
    undocumented = [line.strip() for index, line in enumerate(lines)
                    if DECLARATION.match(line) and "//" not in line and not lines[index - 1].strip().startswith("//")]
    assert not undocumented, undocumented
