"""`rnnserve-bundle`: a bundle around an ONNX graph made elsewhere (any framework, any architecture).

The manifest is written from the graph's own signature: the token input and logits output named on
the command line, each state an input and an output of one shape and dtype. What a signature cannot
show (that the graph is a step function of its state: T tokens in one call equal T calls of one token,
and a session beside another in a batch is unaffected) the server's parity self-test proves before
anything is written; a graph that drops its state is refused here, not at the first wrong answer.
Torch-free: a graph and a vocabulary are all it needs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from rnnserve import bundle as bundle_format
from rnnserve.server.model.self_test import DEFAULT_TOLERANCE, self_test
from rnnserve.vocab import AnyVocabulary, IdVocabulary, TokenizerVocabulary, Vocabulary


def state_spec(pair: str, signature: dict[str, tuple[str, list]]) -> bundle_format.StateSpec:
    """`IN:OUT` as a state: both in the graph, of one dtype and one shape `[batch, *static]`."""
    if pair.count(":") != 1:
        raise bundle_format.BundleError(f"--state {pair!r}: give INPUT:OUTPUT, the graph's names for one state")
    inp, out = pair.split(":")
    for name in (inp, out):
        if name not in signature:
            raise bundle_format.BundleError(f"--state {pair!r}: the graph has no {name!r} (it has {sorted(signature)})")
    (in_dtype, in_dims), (out_dtype, out_dims) = signature[inp], signature[out]
    if (in_dtype, in_dims[1:]) != (out_dtype, out_dims[1:]):
        raise bundle_format.BundleError(f"--state {pair!r}: {inp} is {in_dtype} {in_dims} but {out} is {out_dtype} "
                                        f"{out_dims}: a new state must have its state's shape and dtype")
    if in_dtype not in bundle_format.STATE_DTYPES:
        raise bundle_format.BundleError(f"--state {pair!r}: {in_dtype} states are not served "
                                        f"(one of {bundle_format.STATE_DTYPES})")
    if not in_dims or isinstance(in_dims[0], int) or not all(isinstance(d, int) and d > 0 for d in in_dims[1:]):
        raise bundle_format.BundleError(f"--state {pair!r}: shape {in_dims} must be [batch, *fixed sizes], the batch "
                                        "axis dynamic and the rest static")
    name = inp.removesuffix("_in") or inp
    return bundle_format.StateSpec(name, inp, out, tuple(in_dims[1:]), in_dtype)


def vocabulary_of(args: argparse.Namespace) -> AnyVocabulary:
    if args.tokenizer:
        return TokenizerVocabulary(args.tokenizer.read_text(encoding="utf-8"))
    if args.characters:
        return Vocabulary.from_text(args.characters.read_text(encoding="utf-8"))
    return IdVocabulary(args.vocab_size)


def build(graph: Path, vocab: AnyVocabulary, states: list[str], out_dir: Path, *, tokens: str, logits: str,
          name: str, version: str, cell: str, tolerance: float) -> bundle_format.Bundle:
    """Check the graph's signature against the vocabulary and states, self-test it, and install the bundle."""
    signature = bundle_format.graph_signature(graph)
    specs = [state_spec(pair, signature) for pair in states]
    if not specs:
        raise bundle_format.BundleError("give at least one --state INPUT:OUTPUT: a model with no state needs no "
                                        "session server")
    named = {tokens, *(s.input for s in specs)}
    unnamed = [n for n in bundle_format.graph_inputs(graph) if n not in named]
    if unnamed:
        raise bundle_format.BundleError(f"{graph}: inputs {unnamed} are neither --tokens nor a --state: the server "
                                        "feeds nothing else")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        staging = Path(tmp) / "bundle"
        staging.mkdir()
        shutil.copyfile(graph, staging / bundle_format.GRAPH)
        manifest = {
            "format_version": bundle_format.FORMAT_VERSION,
            "name": name,
            "version": version,
            "cell": cell,
            "sizes": {"vocab_size": len(vocab)},
            "vocabulary": bundle_format.write_vocabulary(staging, vocab),
            "tokens_input": tokens,
            "logits_output": logits,
            "state": [s.to_dict() for s in specs],
            "graph": {"file": bundle_format.GRAPH, "sha256": bundle_format.sha256_of(staging / bundle_format.GRAPH),
                      "exporter": f"rnnserve-bundle from {graph.name}"},
            "parity": {"tolerances": {"steps": tolerance}},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        bundle_format.write_manifest(staging, manifest)
        self_test(bundle_format.load_bundle(staging))  # the signature checks, then split invariance
        return bundle_format.install(staging, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="rnnserve-bundle",
        description="Make a bundle (model.onnx + manifest.json + vocabulary) around an ONNX graph exported elsewhere. "
                    "The graph takes token ids [batch, time] int64 and each state [batch, ...] and returns logits "
                    "[batch, time, vocab] float32 and each new state; it must pass the server's parity self-test.")
    parser.add_argument("--graph", type=Path, required=True, help="the ONNX graph")
    vocabulary = parser.add_mutually_exclusive_group(required=True)
    vocabulary.add_argument("--tokenizer", type=Path, help="a Hugging Face tokenizers tokenizer.json")
    vocabulary.add_argument("--vocab-size", type=int, help="ids only: this many ids, no text")
    vocabulary.add_argument("--characters", type=Path,
                            help="characters: a text file whose distinct characters, sorted, follow <unk> (id 0)")
    parser.add_argument("--state", action="append", default=[], metavar="IN:OUT", required=True,
                        help="a state: the graph's input and output names for it (repeat for each state)")
    parser.add_argument("--tokens", default=bundle_format.TOKENS_INPUT, help="the token ids input (default tokens)")
    parser.add_argument("--logits", default=bundle_format.LOGITS_OUTPUT, help="the logits output (default logits)")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    parser.add_argument("--name", default=None, help="model name (default: the graph's file name)")
    parser.add_argument("--version", default="1", help="model version")
    parser.add_argument("--cell", default="custom", help="the architecture's name, shown by Admin and metrics")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="the self-test's bound on steps against one call (relative, default %(default)g)")
    args = parser.parse_args(argv)
    try:
        bundle = build(args.graph, vocabulary_of(args), args.state, args.out, tokens=args.tokens, logits=args.logits,
                       name=args.name or args.graph.stem, version=args.version, cell=args.cell,
                       tolerance=args.tolerance)
    except (bundle_format.BundleError, OSError, ValueError) as err:
        sys.exit(f"rnnserve-bundle: {err}")
    print(f"wrote {bundle.path}: {bundle.name} version {bundle.version}, {len(bundle.vocab)} {bundle.vocab.kind} "
          f"tokens, state {bundle.describe_states()}")


if __name__ == "__main__":
    main()
