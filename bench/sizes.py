"""How big each run is: the reference sizes from ../shared/WORKLOAD.md, and two smaller presets.

`full` is the only preset whose figures may be committed or compared against the targets; `quick`
keeps every workload and session count but shrinks the step counts, for a smoke run of a minute
or two; `smoke` also shrinks the model, so that a test can run the whole harness in seconds.
The row names stay those of the full workload (e.g. `first100_p50_us`) in every preset; the
sizes actually used are written into latest.json beside the rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rnnserve.export.model import ModelConfig


@dataclass(frozen=True)
class Sizes:
    # The model's defaults are the reference model: a character LSTM, 2 x 512, embedding 128, 100 tokens.
    model: ModelConfig = ModelConfig()
    model_seed: int = 0  # random weights from a fixed seed: timing does not depend on training
    batches: tuple[int, ...] = (1, 16, 64, 256)  # F1 batch sizes and W2/F2 session counts
    f1_seconds: float = 1.0  # F1 time budget per batch size; at least f1_min_calls calls each
    f1_min_calls: int = 20
    # F1 rounds, spread over the run (at most 3: start, after W1-W4, after M1); each figure is their median
    f1_rounds: int = 3
    # Rounds of W1 and W2 at the most sessions (stream and StepBatch), and of their floors F2 at 1 and the most
    # streams, spread over the run (at most 3: in W1-W4, after M1, after W5); each figure is their median. Full
    # runs minutes apart read W2 StepBatch at 16,875 and 20,676 tokens/s with the same code and the same F1, and
    # F2 at 256 streams at 14,969 and 18,422: single loops of a few seconds meet the machine's slow spells.
    headline_rounds: int = 3
    prefill_tokens: int = 1000  # F1 prefill and W4 prompt length
    prefill_repeats: int = 20  # F1 prefill and W4 take the median of this many
    w1_steps: int = 500
    w2_steps: int = 200  # per session, closed loop
    w3_steps: int = 2000
    w3_window: int = 100  # W3 compares the medians of the first and the last window
    w5_sessions: int = 100_000
    warmup_steps: int = 5  # untimed steps per session before each timed loop
    # Each session operation (fork, rewind, score, export plus import) and the plain step beside it are timed
    # this many times: a p99 wants a couple of hundred, and each costs about a step.
    op_repeats: int = 200
    # M1 alternates servers with metrics on and off this many times (each ~90 s) and takes the median ratio:
    # one round swung from 90% to 153% between quiet runs, more than any cost metrics could have.
    metrics_rounds: int = 3
    # The batching stage starts a server per batcher setting, each in turn, this many times; each figure is the
    # median of its rounds, so that a slow spell of the machine falls on every setting alike.
    batching_rounds: int = 2
    # Issue 14's models stage starts a one-model and a two-model server in turn this many times; each ratio is the
    # median of its rounds' (the two servers of a round run back to back, so they share the machine's spells).
    models_rounds: int = 3

    @property
    def most_sessions(self) -> int:
        """The largest session count, where the targets read W2 and F2."""
        return max(self.batches)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "full": Sizes(),
    "quick": Sizes(f1_seconds=0.3, f1_min_calls=5, f1_rounds=1, prefill_repeats=3, w1_steps=100, w2_steps=20, w3_steps=400,
                   w3_window=20, w5_sessions=5_000, warmup_steps=2, op_repeats=50, metrics_rounds=3, headline_rounds=1,
                   batching_rounds=1, models_rounds=1),
    "smoke": Sizes(model=ModelConfig(layers=1, hidden_size=32, embed_size=16), f1_seconds=0.02,
                   f1_min_calls=2, f1_rounds=1, prefill_tokens=50, prefill_repeats=2, w1_steps=10, w2_steps=4, w3_steps=20,
                   w3_window=5, w5_sessions=50, warmup_steps=1, op_repeats=5, metrics_rounds=1, headline_rounds=2,
                   batching_rounds=1, models_rounds=1),
}
