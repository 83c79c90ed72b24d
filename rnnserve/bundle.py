"""The model bundle: `model.onnx` plus `manifest.json`, the one contract between export and serving.

`export/` writes bundles (with torch); the server loads them (without). Both sides go through
this module, so what the manifest promises is checked in one place: the graph's sha256, its
inputs and outputs against the manifest's names, shapes and dtypes, and the vocabulary against
the logits. A bundle that fails any check is refused with a message that names the check.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from rnnserve.vocab import Vocabulary

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "model.onnx"
TOKENS_INPUT = "tokens"
LOGITS_OUTPUT = "logits"
STATE_DTYPE = "float32"
_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}


class BundleError(ValueError):
    """A bundle that must not be served; the message names the file and the failed check."""


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor, batch-major [batch, layers, hidden] float32."""

    name: str
    input: str
    output: str
    layers: int
    hidden: int

    @property
    def row_shape(self) -> tuple[int, int]:
        return (self.layers, self.hidden)

    def to_dict(self) -> dict:
        return {"name": self.name, "input": self.input, "output": self.output,
                "shape": ["batch", self.layers, self.hidden], "dtype": STATE_DTYPE}


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    vocab: Vocabulary
    states: tuple[StateSpec, ...]

    @property
    def graph_path(self) -> Path:
        return self.path / GRAPH

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def cell(self) -> str:
        return self.manifest["cell"]

    @property
    def sha256(self) -> str:
        return self.manifest["graph"]["sha256"]

    @property
    def tokens_input(self) -> str:
        return TOKENS_INPUT

    @property
    def logits_output(self) -> str:
        return LOGITS_OUTPUT

    @property
    def state_bytes_per_session(self) -> int:
        return sum(4 * s.layers * s.hidden for s in self.states)


DEFAULT_MODEL = "shakespeare-lstm"


def default_repository_path() -> Path:
    """The model repository shipped inside the package (rnnserve/repository.py reads its layout)."""
    return Path(__file__).resolve().parent / "models"


def default_bundle_path() -> Path:
    """The bundle served when no other is named: the default version of the shipped default model.

    The version is the one the model's model.json pins (the float graph; the int8 copy beside it
    is a version too), read rather than written here so that pinning another needs no code change.
    """
    from rnnserve.repository import scan_model  # imported here: it imports this module's BundleError

    return scan_model(default_repository_path() / DEFAULT_MODEL).version_path()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require(manifest: dict, *keys: str, where: Path) -> None:
    missing = [k for k in keys if k not in manifest]
    if missing:
        raise BundleError(f"{where}: manifest lacks {', '.join(missing)}")


def _graph_signature(graph_path: Path) -> dict[str, tuple[str, list]]:
    """{name: (dtype, shape)} of the graph's inputs and outputs; dynamic axes appear by name."""
    try:
        model = onnx.load(str(graph_path), load_external_data=False)
    except Exception as err:  # onnx raises several types for a corrupt file
        raise BundleError(f"{graph_path}: not a readable ONNX graph ({err})") from None
    signature = {}
    for value in [*model.graph.input, *model.graph.output]:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        signature[value.name] = (_ONNX_DTYPES.get(tensor.elem_type, str(tensor.elem_type)), dims)
    return signature


def _check_tensor(signature: dict, name: str, dtype: str, tail: list, where: Path) -> None:
    """The graph has `name` of `dtype` whose shape ends in the static dims `tail`."""
    if name not in signature:
        raise BundleError(f"{where}: graph has no input or output named {name!r} (it has {sorted(signature)})")
    actual_dtype, dims = signature[name]
    if actual_dtype != dtype:
        raise BundleError(f"{where}: {name!r} is {actual_dtype} in the graph, the manifest says {dtype}")
    if len(dims) != 1 + len(tail) or any(not isinstance(d, str) for d in dims[:1]) or dims[1:] != tail:
        raise BundleError(f"{where}: {name!r} has shape {dims} in the graph, the manifest says ['batch', *{tail}]")


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle directory; raise BundleError naming what is wrong."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no {MANIFEST} (is this a bundle directory?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path}: not valid JSON ({err})") from None
    _require(manifest, "format_version", "name", "version", "cell", "sizes", "vocabulary", "state", "graph",
             where=manifest_path)
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: format_version {manifest['format_version']} is not supported "
                          f"(this rnnserve reads {FORMAT_VERSION})")
    graph_path = path / GRAPH
    if not graph_path.is_file():
        raise BundleError(f"{path}: no {GRAPH}")
    actual = sha256_of(graph_path)
    if actual != manifest["graph"].get("sha256"):
        raise BundleError(f"{graph_path}: sha256 {actual} does not match the manifest's "
                          f"{manifest['graph'].get('sha256')} (corrupt or replaced graph)")
    try:
        vocab = Vocabulary(manifest["vocabulary"]["tokens"])
        states = tuple(StateSpec(s["name"], s["input"], s["output"], int(s["shape"][1]), int(s["shape"][2]))
                       for s in manifest["state"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise BundleError(f"{manifest_path}: malformed vocabulary or state entry ({err})") from None
    if len(vocab) != manifest["sizes"].get("vocab_size"):
        raise BundleError(f"{manifest_path}: vocabulary has {len(vocab)} tokens, sizes.vocab_size says "
                          f"{manifest['sizes'].get('vocab_size')}")
    signature = _graph_signature(graph_path)
    _check_tensor(signature, TOKENS_INPUT, "int64", ["time"], graph_path)
    _check_tensor(signature, LOGITS_OUTPUT, "float32", ["time", len(vocab)], graph_path)
    for state in states:
        _check_tensor(signature, state.input, STATE_DTYPE, list(state.row_shape), graph_path)
        _check_tensor(signature, state.output, STATE_DTYPE, list(state.row_shape), graph_path)
    return Bundle(path, manifest, vocab, states)


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def install(staging: Path, out_dir: Path) -> Bundle:
    """Check a bundle assembled in `staging` with the server's own loader, then move it to `out_dir`.

    Writers assemble a bundle elsewhere and install it last, so that a bundle directory is either
    complete and valid or absent, never half written.
    """
    load_bundle(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(out_dir))
    return load_bundle(out_dir)
