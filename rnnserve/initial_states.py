"""Initial states shipped in a bundle: the state after a prompt, stored so that sessions may start from it.

What RWKV servers call state tuning: a session that starts from a shipped state behaves as if it
had read the state's prompt, without reading it and without counting it in its position. A
bundle lists its states in the manifest's optional "initial_states" (name, file, prompt); each
file holds, little-endian float32, every state tensor's row in manifest order, then the
next-token logits after the prompt, so the first prediction needs no model call either.

Adding one runs the bundle's own graph with onnxruntime, so it needs no torch:

    python -m rnnserve.initial_states BUNDLE_DIR NAME "PROMPT"
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnserve.bundle import MANIFEST, Bundle, BundleError, load_bundle, write_manifest

STATES_DIR = "states"
_DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class ShippedState:
    name: str
    prompt: str
    states: dict[str, np.ndarray]  # state name -> [layers, hidden] float32
    next_logits: np.ndarray  # [vocab] float32


def load_initial_states(bundle: Bundle) -> list[ShippedState]:
    """The bundle's shipped states, each file checked for its size; BundleError naming the file otherwise."""
    shipped = []
    for entry in bundle.manifest.get("initial_states", []):
        path = bundle.path / entry["file"]
        sizes = [int(np.prod(state.row_shape)) for state in bundle.states] + [len(bundle.vocab)]
        try:
            values = np.fromfile(path, _DTYPE)
        except OSError as err:
            raise BundleError(f"{path}: initial state {entry['name']!r} cannot be read ({err})") from None
        if len(values) != sum(sizes):
            raise BundleError(f"{path}: initial state {entry['name']!r} holds {len(values)} floats, the model's "
                              f"state and logits are {sum(sizes)}")
        parts = np.split(values.astype(np.float32), np.cumsum(sizes)[:-1])
        states = {spec.name: part.reshape(spec.row_shape) for spec, part in zip(bundle.states, parts)}
        shipped.append(ShippedState(entry["name"], entry.get("prompt", ""), states, parts[-1]))
    return shipped


def state_after(bundle: Bundle, prompt: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The state rows and next-token logits after reading `prompt` from zeros, with the bundle's graph."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle.graph_path), providers=["CPUExecutionProvider"])
    feed = {bundle.tokens_input: bundle.vocab.encode(prompt)[np.newaxis],
            **{s.input: s.zeros(1) for s in bundle.states}}
    logits, *states = session.run([bundle.logits_output, *(s.output for s in bundle.states)], feed)
    return {spec.name: state[0] for spec, state in zip(bundle.states, states)}, logits[0, -1]


def _write_state(bundle: Bundle, name: str, prompt: str, relative: str | None = None) -> dict:
    """Compute the state after `prompt` with the bundle's graph into its file (`relative` to the bundle,
    states/NAME.f32 by default); the manifest entry that names it."""
    states, next_logits = state_after(bundle, prompt)
    relative = relative or f"{STATES_DIR}/{name}.f32"
    (bundle.path / relative).parent.mkdir(parents=True, exist_ok=True)
    values = np.concatenate([*(states[spec.name].ravel() for spec in bundle.states), next_logits.ravel()])
    values.astype(_DTYPE).tofile(bundle.path / relative)
    return {"name": name, "file": relative, "prompt": prompt}


def add_initial_state(bundle_dir: Path, name: str, prompt: str) -> ShippedState:
    """Compute the state after `prompt` and ship it in the bundle as `name` (replacing one of that name)."""
    entry = _write_state(load_bundle(bundle_dir), name, prompt)
    manifest = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    entries = [old for old in manifest.get("initial_states", []) if old["name"] != name]
    manifest["initial_states"] = [*entries, entry]
    write_manifest(bundle_dir, manifest)
    return next(state for state in load_initial_states(load_bundle(bundle_dir)) if state.name == name)


def recompute_initial_states(bundle_dir: Path) -> list[ShippedState]:
    """Recompute every shipped state from its prompt with the bundle's own graph, names and order kept.

    A state is only meaningful for the graph that made it: a bundle whose graph was replaced (an
    int8 copy of a float bundle) would otherwise start sessions from another graph's state.
    """
    bundle = load_bundle(bundle_dir)
    entries = [{**entry, **_write_state(bundle, entry["name"], entry.get("prompt", ""), entry["file"])}
               for entry in bundle.manifest.get("initial_states", [])]
    if entries:
        manifest = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
        manifest["initial_states"] = entries
        write_manifest(bundle_dir, manifest)
    return load_initial_states(load_bundle(bundle_dir))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Ship the state after a prompt in a bundle, as a named initial state.")
    parser.add_argument("bundle", type=Path, help="the bundle directory (manifest.json + model.onnx)")
    parser.add_argument("name", help="the state's name, as CreateSessionRequest.initial_state gives it")
    parser.add_argument("prompt", help="the text whose state it is")
    args = parser.parse_args(argv)
    shipped = add_initial_state(args.bundle, args.name, args.prompt)
    print(f"{args.bundle}: initial state {shipped.name!r} after {len(shipped.prompt)} characters")


if __name__ == "__main__":
    main()
