"""The committed stubs are exactly what `python proto/generate.py` makes from the .proto."""

import importlib.util
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2

ROOT = Path(__file__).resolve().parents[1]
STUB_DIR = ROOT / "proto" / "rnnserve" / "v1"


def load_generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto(tmp_path: Path):
    load_generator().generate(tmp_path)
    fresh = sorted((tmp_path / "rnnserve").glob("*/*_pb2*.py*"))
    assert [p.name for p in fresh] == ["inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py",
                                       "rnnserve_pb2.py", "rnnserve_pb2.pyi", "rnnserve_pb2_grpc.py"]
    for generated in fresh:
        committed = STUB_DIR.parent / generated.parent.name / generated.name
        assert committed.read_text() == generated.read_text(), f"{committed} is stale: run `python proto/generate.py`"


@pytest.mark.parametrize("installed", [status_pb2, error_details_pb2], ids=lambda module: module.__name__)
def test_the_shipped_google_rpc_protos_describe_what_the_server_sends(tmp_path: Path, installed):
    """proto/google/rpc (for clients in other languages) declares the messages of the Python package the server
    encodes its errors with, field for field."""
    from grpc_tools import protoc

    generator, descriptor_set = load_generator(), tmp_path / "set.pb"
    name = installed.DESCRIPTOR.name
    args = ["protoc", f"-I{generator.PROTO_ROOT}", *(f"-I{p}" for p in generator.include_paths()),
            f"--descriptor_set_out={descriptor_set}", name]
    assert protoc.main(args) == 0
    [shipped] = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    expected = descriptor_pb2.FileDescriptorProto()
    installed.DESCRIPTOR.CopyToProto(expected)
    for message in shipped.message_type:
        _clear_json_names(message)  # protoc fills them in; the Python package's descriptor leaves them implied
    assert shipped.package == expected.package and list(shipped.message_type) == list(expected.message_type)


def _clear_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _clear_json_names(nested)


DECLARATION = re.compile(r"^\s*(rpc |message |enum |(repeated |optional )?[\w.<>, ]+ \w+ = \d+;)")


@pytest.mark.parametrize("proto", [STUB_DIR / "rnnserve.proto", ROOT / "proto" / "rnnserve" / "kserve_v2" /
                                   "inference.proto"], ids=lambda path: path.name)
def test_every_rpc_message_and_field_is_documented(proto: Path):
    """Each declaration has a comment on the line before it or at the end of its own line."""
    lines = proto.read_text().splitlines()
    undocumented = [line.strip() for index, line in enumerate(lines)
                    if DECLARATION.match(line) and "//" not in line and not lines[index - 1].strip().startswith("//")]
    assert not undocumented, undocumented
