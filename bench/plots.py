"""The two pictures of a run: throughput against sessions, and step-latency distributions.

Each puts the server beside its floors, so a reviewer sees the gap rather than a bare number.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the suite runs headless
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import NullFormatter  # noqa: E402

from bench.stats import Results, Row  # noqa: E402

# (workload, variant, rate metric, legend): the throughput curves, floors first.
CURVES = [("F1", "ort", "tokens_per_s", "F1 onnxruntime in-process (batch = sessions)"),
          ("F2", "echo", "messages_per_s", "F2 grpc.aio echo, a stream per session"),
          ("W2", "stream", "tokens_per_s", "W2 server, a stream per session"),
          ("W2", "unary", "tokens_per_s", "W2 server, a Step call per step"),
          ("W2", "multi", "tokens_per_s", "W2 server, all sessions in one StepBatch"),
          ("W2", "multi-2", "tokens_per_s", "W2 server, two StepBatch messages in flight"),
          # issue 14: one point, at the most sessions
          ("W2-models", "stream-two-busy", "tokens_per_s", "W2 server of two models, half the streams on each")]

# The latency series compared in each panel, each with one colour in every panel: the echo floor
# and the server's per-step APIs (W1 exists at 1 session only, two busy models at the most).
LATENCY_SERIES = {("F2", "echo"): "tab:orange", ("W1", "stream"): "tab:gray", ("W2", "stream"): "tab:green",
                  ("W2", "unary"): "tab:red", ("W2-models", "stream-two-busy"): "tab:purple"}


def throughput(rows: list[Row], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for workload, variant, metric, label in CURVES:
        points = sorted((r.sessions, r.value) for r in rows
                        if (r.workload, r.variant, r.metric) == (workload, variant, metric))
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="concurrent sessions", ylabel="tokens (messages) per second",
           title="Throughput against sessions (client and server share the cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency(results: Results, sessions: tuple[int, ...], path: Path) -> None:
    """Cumulative distributions of step latency, one panel per session count."""
    fig, axes = plt.subplots(1, len(sessions), figsize=(4 * len(sessions), 3.8), sharey=True)
    for ax, count in zip(axes, sessions):
        for (workload, variant), colour in LATENCY_SERIES.items():
            samples = sorted(results.latencies_us.get(f"{workload} {variant} S={count}", []))
            if samples:
                ax.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))], color=colour,
                        label=f"{workload} {variant}")
        ax.set(xscale="log", xlabel="step latency (us)", title=f"{count} session{'s' if count > 1 else ''}")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones overlap
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("fraction of steps")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
