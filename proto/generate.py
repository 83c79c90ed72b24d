"""Generate the Python stubs of rnnserve.v1 beside the .proto: `python proto/generate.py`.

The stubs are committed so that the server installs without grpcio-tools; a test regenerates
them into a temporary folder and fails when the committed ones have drifted from the .proto.
The google/rpc protos it imports are read from proto/google/rpc, the copies shipped for clients
in other languages, so the stubs are made from exactly what those clients load.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ["rnnserve/v1/rnnserve.proto"]


def include_paths() -> list[str]:
    """Beside PROTO_ROOT: the well-known types (google/protobuf), which ship with grpcio-tools."""
    import grpc_tools

    return [str(Path(grpc_tools.__file__).parent / "_proto")]


def generate(out_dir: Path = PROTO_ROOT) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTO_ROOT}", *(f"-I{p}" for p in include_paths()),
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *PROTO_FILES]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
