"""Generate the Python stubs of rnnserve.v1 and of the v2 protocol beside their .proto: `python proto/generate.py`.

The stubs are committed so that the server installs without grpcio-tools; a test regenerates
them into a temporary folder and fails when the committed ones have drifted from the .proto.
The google/rpc protos it imports are read from proto/google/rpc, the copies shipped for clients
in other languages, so the stubs are made from exactly what those clients load.

The v2 protocol's messages (package `inference`) are registered in a descriptor pool of their
own rather than protobuf's process-wide one: tritonclient registers the same names from its own
grpc_service.proto there, and one pool refuses a name defined by two files, so a process holding
both (the tests, a gateway that also calls Triton) could not import the second.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ["rnnserve/v1/rnnserve.proto", "rnnserve/kserve_v2/inference.proto"]
PRIVATE_POOL_STUBS = ["rnnserve/kserve_v2/inference_pb2.py"]
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def include_paths() -> list[str]:
    """Beside PROTO_ROOT: the well-known types (google/protobuf), which ship with grpcio-tools."""
    import grpc_tools

    return [str(Path(grpc_tools.__file__).parent / "_proto")]


def use_private_pool(stub: Path) -> None:
    """Make `stub` register its file in a pool of its own (see the module's docstring)."""
    text = stub.read_text()
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit(f"{stub}: expected one {DEFAULT_POOL!r} to replace; protoc's output has changed")
    stub.write_text(text.replace(DEFAULT_POOL, PRIVATE_POOL))


def generate(out_dir: Path = PROTO_ROOT) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTO_ROOT}", *(f"-I{p}" for p in include_paths()),
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *PROTO_FILES]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    for stub in PRIVATE_POOL_STUBS:
        use_private_pool(out_dir / stub)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
