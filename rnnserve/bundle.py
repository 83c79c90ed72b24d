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

import numpy as np
import onnx

from rnnserve.vocab import AnyVocabulary, vocabulary_from_manifest

FORMAT_VERSION = 2  # what writers write: named token and logits tensors, states of any shape and dtype, 3 vocabularies
READABLE_FORMATS = (1, 2)  # format 1: states [batch, layers, hidden] float32, "tokens" and "logits", characters
MANIFEST = "manifest.json"
GRAPH = "model.onnx"
TOKENS_INPUT = "tokens"  # the names format 1 fixes, and writers' defaults
LOGITS_OUTPUT = "logits"
STATE_DTYPES = ("float32", "float16")
_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.INT64: "int64"}


class BundleError(ValueError):
    """A bundle that must not be served; the message names the file and the failed check."""


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor: batch-major `[batch, *shape]`, stored as `dtype` (float32 or float16)."""

    name: str
    input: str
    output: str
    shape: tuple[int, ...]  # without the batch axis: [layers, hidden] for an LSTM, [layers, heads, dim, state]...
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in STATE_DTYPES:
            raise ValueError(f"state {self.name!r}: dtype {self.dtype!r} is not one of {STATE_DTYPES}")
        if not all(isinstance(d, int) and d > 0 for d in self.shape):
            raise ValueError(f"state {self.name!r}: shape {list(self.shape)} must be positive integers")

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def zeros(self, batch: int) -> np.ndarray:
        """The state of `batch` sessions that have read nothing: `[batch, *shape]` of the storage dtype."""
        return np.zeros((batch, *self.shape), self.dtype)

    def to_dict(self) -> dict:
        return {"name": self.name, "input": self.input, "output": self.output,
                "shape": ["batch", *self.shape], "dtype": self.dtype}

    @classmethod
    def from_dict(cls, entry: dict) -> StateSpec:
        if entry["shape"][0] != "batch":
            raise ValueError(f"state {entry['name']!r}: shape {entry['shape']} must start with 'batch'")
        return cls(entry["name"], entry["input"], entry["output"], tuple(int(d) for d in entry["shape"][1:]),
                   entry.get("dtype", "float32"))


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    vocab: AnyVocabulary
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
        """The architecture's name as its exporter gave it (lstm, gru, mingru...): a label, never a switch."""
        return self.manifest["cell"]

    @property
    def sha256(self) -> str:
        return self.manifest["graph"]["sha256"]

    @property
    def tokens_input(self) -> str:
        return self.manifest.get("tokens_input", TOKENS_INPUT)

    @property
    def logits_output(self) -> str:
        return self.manifest.get("logits_output", LOGITS_OUTPUT)

    @property
    def state_bytes_per_session(self) -> int:
        return sum(s.row_bytes for s in self.states)

    def describe_states(self) -> str:
        """The states for a log line: `h [2, 16] float32, c [2, 16] float32`."""
        return ", ".join(f"{s.name} {list(s.shape)} {s.dtype}" for s in self.states)


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


def _load_graph(graph_path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(graph_path), load_external_data=False)
    except Exception as err:  # onnx raises several types for a corrupt file
        raise BundleError(f"{graph_path}: not a readable ONNX graph ({err})") from None


def graph_inputs(graph_path: Path) -> list[str]:
    """The names of the graph's inputs that a caller feeds (initializers listed as inputs excluded)."""
    model = _load_graph(graph_path)
    constants = {tensor.name for tensor in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in constants]


def graph_signature(graph_path: Path) -> dict[str, tuple[str, list]]:
    """{name: (dtype, shape)} of the graph's inputs and outputs; dynamic axes appear by name."""
    model = _load_graph(graph_path)
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
    if manifest["format_version"] not in READABLE_FORMATS:
        raise BundleError(f"{manifest_path}: format_version {manifest['format_version']} is not supported "
                          f"(this rnnserve reads {', '.join(map(str, READABLE_FORMATS))})")
    graph_path = path / GRAPH
    if not graph_path.is_file():
        raise BundleError(f"{path}: no {GRAPH}")
    actual = sha256_of(graph_path)
    if actual != manifest["graph"].get("sha256"):
        raise BundleError(f"{graph_path}: sha256 {actual} does not match the manifest's "
                          f"{manifest['graph'].get('sha256')} (corrupt or replaced graph)")
    vocab = _vocabulary(manifest, path, manifest_path)
    try:
        states = tuple(StateSpec.from_dict(s) for s in manifest["state"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise BundleError(f"{manifest_path}: malformed state entry ({err})") from None
    if not states:
        raise BundleError(f"{manifest_path}: no state tensors: a model with no state needs no session server")
    if len(vocab) != manifest["sizes"].get("vocab_size"):
        raise BundleError(f"{manifest_path}: vocabulary has {len(vocab)} tokens, sizes.vocab_size says "
                          f"{manifest['sizes'].get('vocab_size')}")
    bundle = Bundle(path, manifest, vocab, states)
    signature = graph_signature(graph_path)
    _check_tensor(signature, bundle.tokens_input, "int64", ["time"], graph_path)
    _check_tensor(signature, bundle.logits_output, "float32", ["time", len(vocab)], graph_path)
    for state in states:
        _check_tensor(signature, state.input, state.dtype, list(state.shape), graph_path)
        _check_tensor(signature, state.output, state.dtype, list(state.shape), graph_path)
    return bundle


def _vocabulary(manifest: dict, path: Path, manifest_path: Path) -> AnyVocabulary:
    """The manifest's vocabulary, its tokenizer file read from the bundle (and checked against its sha256)."""
    entry = manifest["vocabulary"]

    def read_file(name: str) -> str:
        file = path / name
        if Path(name).name != name or not file.is_file():
            raise BundleError(f"{path}: the vocabulary's file {name!r} is not in the bundle")
        expected = entry.get("sha256")
        if expected is not None and sha256_of(file) != expected:
            raise BundleError(f"{file}: sha256 does not match the manifest's {expected} (corrupt or replaced)")
        return file.read_text(encoding="utf-8")

    try:
        return vocabulary_from_manifest(entry, read_file)
    except BundleError:
        raise
    except Exception as err:  # KeyError, ValueError, and the tokenizers library's own exceptions
        raise BundleError(f"{manifest_path}: malformed vocabulary entry ({err})") from None


def write_vocabulary(directory: Path, vocab: AnyVocabulary) -> dict:
    """Write the vocabulary's file into the bundle being assembled (a tokenizer's tokenizer.json); its manifest entry."""
    entry = vocab.manifest_entry()
    if "file" in entry:
        file = directory / entry["file"]
        file.write_text(vocab.json, encoding="utf-8")
        entry["sha256"] = sha256_of(file)
    return entry


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
