"""The benchmark harness end to end, in its smoke preset: a live server, every row the targets read.

Runs `python -m bench --smoke` as a user would (a tiny model, tiny counts) into a temporary
folder, so the committed bench/results are never touched, and checks latest.json's format.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = (1, 16, 64, 256)

# (workload, variant): (session counts, metrics), as issue 4 lists them; W5's count is the preset's.
REQUIRED = {
    ("F1", "ort"): (SESSIONS, ("tokens_per_s", "p50_us")),
    ("F1", "prefill"): ((1,), ("tokens_per_s",)),
    ("F1", "ort-paced"): ((1,), ("p50_us",)),
    ("F2", "echo"): (SESSIONS, ("messages_per_s", "p50_us")),
    ("W1", "stream"): ((1,), ("p50_us", "p99_us")),
    ("W2", "stream"): (SESSIONS, ("tokens_per_s", "p50_us", "p99_us")),
    ("W2", "unary"): (SESSIONS, ("tokens_per_s", "p50_us", "p99_us")),
    ("W2", "multi"): ((256,), ("tokens_per_s",)),
    ("W3", "stateful"): ((1,), ("first100_p50_us", "last100_p50_us", "last_first_ratio")),
    ("W3", "stateless"): ((1,), ("first100_p50_us", "last100_p50_us", "last_first_ratio")),
    ("W4", "prefill"): ((1,), ("tokens_per_s",)),
    ("W2", "http"): ((1, 64), ("tokens_per_s", "p50_us", "p99_us")),  # issue 13: the HTTP face
    ("TTFT", "sse"): ((1,), ("p50_us",)),
    ("TTFT", "grpc"): ((1,), ("p50_us",)),
    **{("M1", f"{transport} metrics-{state}"): ((256,), ("tokens_per_s", "server_cpu_us_per_token"))
       for transport in ("stream", "unary") for state in ("on", "off")},
    ("M1", "stream"): ((256,), ("on_off_ratio",)),
    ("M1", "unary"): ((256,), ("on_off_ratio",)),
}
W5_METRICS = ("rss_bytes", "baseline_rss_bytes", "raw_state_bytes")


def test_smoke_run_reports_every_required_row(tmp_path):
    out = tmp_path / "results"
    subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--cache", str(tmp_path / "cache")],
                   cwd=ROOT, check=True, timeout=240)
    report = json.loads((out / "latest.json").read_text())

    machine = report["machine"]
    assert machine["cores"] >= 1 and len(machine["load_average_before"]) == len(machine["load_average_after"]) == 3
    assert {"python", "onnxruntime", "grpcio"} <= machine.keys() and "share" in machine["note"]

    rows = report["rows"]
    assert all(row.keys() == {"workload", "variant", "sessions", "metric", "value", "unit"} for row in rows)
    assert all(math.isfinite(row["value"]) and row["value"] >= 0 for row in rows)
    found = {(r["workload"], r["variant"], r["sessions"], r["metric"]) for r in rows}
    required = {(w, v, s, m) for (w, v), (counts, metrics) in REQUIRED.items() for s in counts for m in metrics}
    required |= {("W5", "idle", report["run"]["sizes"]["w5_sessions"], m) for m in W5_METRICS}
    assert required - found == set()
    assert len(found) == len(rows)  # a figure measured in rounds is reported once, as their median
    assert (tmp_path / "cache" / "logs" / "echo-round2.log").is_file()  # the echo floor measured again for round 2

    assert {t["status"] for t in report["targets"]} <= {"met", "SHORT"}  # no target lacks its rows
    assert "| figure | value | floor | ratio | target | status |" in (out / "latest.md").read_text()
    assert (out / "throughput.png").stat().st_size > 0 and (out / "latency.png").stat().st_size > 0
