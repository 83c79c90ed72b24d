"""The error every parity figure in a manifest is measured with: a graph's outputs against a reference.

Torch-free, so that the float export (against torch), the int8 copy (against itself, batched
differently) and the server's self-test can measure the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ERROR = "max |onnx - reference| / max(1, |reference|)"


def parity_error(got: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Largest error, scaled by the reference's magnitude where that exceeds 1.

    An LSTM's cell state grows with the sequence (|c| reaches 30 after 40 steps of a trained
    model); float32 holds such a value to about 2e-6 absolute, so a purely absolute 1e-5 bound
    would fail any float32 implementation, torch's own included, on long sequences.
    """
    return max(float((np.abs(x - y) / np.maximum(1.0, np.abs(y))).max()) for x, y in zip(got, reference, strict=True))
