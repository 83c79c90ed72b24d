"""latest.json for scripts and latest.md for review: the same rows, targets and machine.

Figures from different machines or loads are not comparable, so both files carry the machine:
its cores, the load average around the run, the versions, and that the load generator and the
server shared the cores.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime

from bench.sizes import Sizes
from bench.stats import Row
from bench.targets import MiB, Verdict


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine(load_before: tuple[float, ...], load_after: tuple[float, ...]) -> dict:
    cores = os.cpu_count()
    return {
        "cores": cores,
        "cpu": cpu_model(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "note": f"The load generator (one asyncio process), the server and onnxruntime share the same {cores} "
                f"cores; every figure includes the client's own CPU time.",
    }


@dataclass(frozen=True)
class Run:
    """Everything one run produced, as the report writes it."""

    preset: str
    command: str
    server_command: str
    sizes: Sizes
    seconds: float
    machine: dict
    rows: list[Row]
    verdicts: list[Verdict]

    def to_dict(self) -> dict:
        return {"machine": self.machine,
                "run": {"preset": self.preset, "command": self.command, "server_command": self.server_command,
                        "seconds": round(self.seconds, 1), "sizes": self.sizes.to_dict()},
                "rows": [r.to_dict() for r in self.rows],
                "targets": [v.to_dict() for v in self.verdicts]}


def write_json(run: Run, path: Path) -> None:
    path.write_text(json.dumps(run.to_dict(), indent=1) + "\n")


def _value(row: Row) -> str:
    if row.unit == "bytes" and row.value >= MiB:
        return f"{row.value / MiB:,.1f} MiB"
    if row.unit == "ratio":
        return f"{row.value:.2f}"
    return f"{row.value:,.0f} {row.unit}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in lines)]


def markdown(run: Run) -> str:
    m = run.machine
    load = "load average {:.2f} before, {:.2f} after".format(m["load_average_before"][0], m["load_average_after"][0])
    lines = [
        f"# rnnserve benchmark ({run.preset})", "",
        f"`{run.command}`, {run.seconds:.0f} s. {m['cores']} cores ({m['cpu']}), {load}; python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, grpcio {m['grpcio']}. {m['note']}", "",
        f"Server: `{run.server_command}`", "",
        "## Targets", "",
        *_table(["figure", "value", "floor", "ratio", "target", "status"],
                [[v.name, v.figure, v.floor, v.ratio, v.target, v.status] for v in run.verdicts]), "",
        "## All figures", "",
        *_table(["workload", "variant", "sessions", "metric", "value"],
                [[r.workload, r.variant, f"{r.sessions:,}", r.metric, _value(r)] for r in run.rows]), "",
        "![throughput](throughput.png)", "", "![latency](latency.png)", "",
    ]
    return "\n".join(lines)


def write_markdown(run: Run, path: Path) -> None:
    path.write_text(markdown(run))
