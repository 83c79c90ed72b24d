"""The parity self-test a bundle passes before it serves: a few steps, run the ways the server runs them.

Bundle checks (`load_bundle`) prove the files are whole and consistent; they cannot prove that the
graph computes what serving relies on: that a session may read its tokens one call at a time or
all at once (a prompt, then steps), alone or batched with other sessions, and end in the same
state. A graph exported with a state input left unconnected, or with a batch dimension that mixes
rows, passes every file check and serves nonsense; this test refuses it before any session
reaches it. The tolerance is the bundle's own (`parity.tolerances.steps` in its manifest, as
measured at export), 1e-4 without one.
"""

from __future__ import annotations

import numpy as np

from rnnserve.bundle import Bundle, BundleError
from rnnserve.parity import parity_error
from rnnserve.server.model.runtime import Runtime

STEPS = 8
DEFAULT_TOLERANCE = 1e-4


class ParityFailure(BundleError):
    """The graph disagrees with itself; the message says which way of running it and by how much."""


def self_test(bundle: Bundle) -> None:
    """Raise ParityFailure unless one call of STEPS tokens, STEPS calls of one token and the same tokens beside
    another session's in a batch of two agree within the bundle's tolerance, with finite logits."""
    tolerance = float(bundle.manifest.get("parity", {}).get("tolerances", {}).get("steps", DEFAULT_TOLERANCE))
    runtime = Runtime(bundle, threads=1, spinning=False)
    vocab = len(bundle.vocab)
    tokens = (np.arange(1, STEPS + 1, dtype=np.int64) * 7919) % vocab  # spread over the vocabulary
    zeros = tuple(state.zeros(1) for state in bundle.states)

    whole = runtime.run(tokens[np.newaxis], zeros)
    if not np.isfinite(whole.logits).all():
        raise ParityFailure(f"{bundle.path}: the logits of {STEPS} steps from zeros are not all finite")
    states, stepped = zeros, []
    for token in tokens:
        result = runtime.run(np.array([[token]], np.int64), states)
        states = result.states
        stepped.append(result.next_logits[0])
    _agree("one token per call", np.stack(stepped), whole.logits[0], tolerance, bundle)
    other = np.stack([tokens, tokens[::-1]])
    batched = runtime.run(other, tuple(np.repeat(state, 2, axis=0) for state in zeros))
    _agree("in a batch of two sessions", batched.logits[0], whole.logits[0], tolerance, bundle)


def _agree(how: str, actual: np.ndarray, expected: np.ndarray, tolerance: float, bundle: Bundle) -> None:
    error = parity_error([actual], [expected])  # the measure of the manifest's figures and tolerance
    if not error <= tolerance:  # NaN fails too
        raise ParityFailure(f"{bundle.path}: {STEPS} steps run {how} differ from one call by {error:.3g} "
                            f"(relative), over the bundle's tolerance {tolerance:g}")
