"""Figures as flat rows, and the latency summaries every workload reports the same way."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Row:
    """One figure: latest.json is a list of these, so that runs can be compared by a script.

    `sessions` is the number of concurrent sessions (streams for F2, the batch size for F1).
    """

    workload: str
    variant: str
    sessions: int
    metric: str
    value: float
    unit: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Timed:
    """What a closed loop measured: its wall time, how many tokens it carried, each step's latency,
    and the CPU time the load generator and the server spent on it (together at most cores x wall)."""

    seconds: float
    tokens: int
    latencies_us: list[float]
    client_cpu_seconds: float
    server_cpu_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def p50(values_us: list[float]) -> float:
    return float(np.percentile(values_us, 50))


def p99(values_us: list[float]) -> float:
    return float(np.percentile(values_us, 99))


@dataclass
class Results:
    """Rows as they are measured, and the step latencies behind them for the distribution plot."""

    rows: list[Row] = field(default_factory=list)
    latencies_us: dict[str, list[float]] = field(default_factory=dict)

    def add(self, workload: str, variant: str, sessions: int, metric: str, value: float, unit: str) -> None:
        self.rows.append(Row(workload, variant, sessions, metric, float(value), unit))

    def add_loop(self, workload: str, variant: str, sessions: int, timed: Timed,
                 rate_metric: str = "tokens_per_s", rate_unit: str = "tokens/s") -> None:
        """Rate, median and p99 latency of a closed loop, in the names the targets read."""
        self.add_loops(workload, variant, sessions, [timed], rate_metric, rate_unit)

    def add_loops(self, workload: str, variant: str, sessions: int, rounds: list[Timed],
                  rate_metric: str = "tokens_per_s", rate_unit: str = "tokens/s") -> None:
        """As `add_loop`, each figure the median of the rounds' (the same closed loop measured at
        points spread over the run, so that one slow spell of the machine does not make the figure)."""

        def add(metric: str, figure: Callable[[Timed], float], unit: str) -> None:
            self.add(workload, variant, sessions, metric, statistics.median(map(figure, rounds)), unit)

        add(rate_metric, lambda timed: timed.tokens_per_s, rate_unit)
        add("p50_us", lambda timed: p50(timed.latencies_us), "us")
        add("p99_us", lambda timed: p99(timed.latencies_us), "us")
        # Where the cores went: per token, so that the load generator's share can be read off.
        add("client_cpu_us_per_token", lambda timed: timed.client_cpu_seconds / timed.tokens * 1e6, "us")
        add("server_cpu_us_per_token", lambda timed: timed.server_cpu_seconds / timed.tokens * 1e6, "us")
        self.latencies_us[f"{workload} {variant} S={sessions}"] = [us for timed in rounds for us in timed.latencies_us]


@dataclass
class Rounds:
    """Closed loops measured in rounds spread over the run, reported together at its end as medians."""

    # by (workload, variant, sessions, rate metric, its unit)
    loops: dict[tuple[str, str, int, str, str], list[Timed]] = field(default_factory=dict)

    def add(self, workload: str, variant: str, sessions: int, timed: Timed,
            rate_metric: str = "tokens_per_s", rate_unit: str = "tokens/s") -> None:
        """As `Results.add_loop`, one round of it."""
        self.loops.setdefault((workload, variant, sessions, rate_metric, rate_unit), []).append(timed)

    def report(self, results: Results) -> None:
        for (workload, variant, sessions, rate_metric, rate_unit), rounds in self.loops.items():
            results.add_loops(workload, variant, sessions, rounds, rate_metric, rate_unit)
