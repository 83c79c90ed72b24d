"""Draw the rnnserve Grafana dashboard's panels as one PNG, from a Prometheus server's data.

    python deploy/render_dashboard.py --prometheus http://localhost:9090 --minutes 15 --out docs/metrics.png

For a picture of the dashboard without Grafana (for the README, a report or an incident note):
each panel's queries from deploy/grafana/dashboards/rnnserve.json are run over the last minutes
through the query_range API, and drawn where the dashboard places them. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator  # noqa: E402

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "rnnserve.json"
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# Grafana's units, as (divisor, suffix) steps from large to small.
UNIT_STEPS = {"s": ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")),
              "bytes": ((2.0**30, "GiB"), (2.0**20, "MiB"), (2.0**10, "KiB"), (1.0, "B"))}


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as response:
        answer = json.load(response)
    if answer["status"] != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return answer["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    return LEGEND_LABEL.sub(lambda found: labels.get(found.group(1), ""), template)


def label_axis(axes: plt.Axes, unit: str) -> None:
    """Ticks at round numbers of the largest unit step the axis reaches, labelled in it, as Grafana does."""
    steps = UNIT_STEPS.get(unit)
    if steps is None:
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.4g}"))
        return
    top = axes.get_ylim()[1]
    divisor, suffix = next(((d, s) for d, s in steps if top >= d), steps[-1])
    axes.yaxis.set_major_locator(FixedLocator(MaxNLocator(6).tick_values(0, top / divisor) * divisor))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value / divisor:.3g} {suffix}"))
    axes.set_ylim(0, top)


def draw_panel(axes: plt.Axes, panel: dict, prometheus: str, start: float, end: float, rate_window: str) -> int:
    """One panel's queries drawn on `axes`; returns how many series had data."""
    step = max(1.0, (end - start) / 300)
    drawn = 0
    for target in panel["targets"]:
        expr = target["expr"].replace("$__rate_interval", rate_window)
        for series in query_range(prometheus, expr, start, end, step):
            points = [(float(t) - end, float(v)) for t, v in series["values"] if math.isfinite(float(v))]
            if not points:
                continue
            seconds, values = zip(*points)
            axes.plot([s / 60 for s in seconds], values, label=legend(target.get("legendFormat", ""), series["metric"]))
            drawn += 1
    axes.set_ylim(bottom=0)
    label_axis(axes, panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short"))
    axes.set_xlim((start - end) / 60, 0)
    axes.set_title(panel["title"], fontsize=10, loc="left")
    axes.tick_params(labelsize=8)
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend(fontsize=7, loc="upper left")
    return drawn


def render(prometheus: str, out: Path, minutes: float, rate_window: str, dashboard: Path = DASHBOARD) -> dict[str, int]:
    """Draw every panel of `dashboard` into `out`, row by row as Grafana lays them out; returns each
    panel's number of series with data."""
    board = json.loads(dashboard.read_text())
    rows: dict[int, list[dict]] = {}
    for panel in sorted(board["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        rows.setdefault(panel["gridPos"]["y"], []).append(panel)
    figure = plt.figure(figsize=(16, 3.2 * len(rows)), layout="constrained")
    grid = figure.add_gridspec(len(rows), 1)
    end = time.time()
    start = end - minutes * 60
    drawn = {}
    for row_grid, panels in zip(grid, rows.values()):
        cells = row_grid.subgridspec(1, len(panels), width_ratios=[p["gridPos"]["w"] for p in panels])
        for cell, panel in zip(cells, panels):
            drawn[panel["title"]] = draw_panel(figure.add_subplot(cell), panel, prometheus, start, end, rate_window)
    figure.suptitle(f"{board['title']}: the last {minutes:g} minutes (x axis: minutes before now)", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return drawn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://localhost:9090", help="Prometheus base URL")
    parser.add_argument("--minutes", type=float, default=15.0, help="how far back to draw")
    parser.add_argument("--rate-window", default="1m",
                        help="what $__rate_interval stands for: at least four scrape intervals")
    parser.add_argument("--out", type=Path, default=Path("docs/metrics.png"))
    args = parser.parse_args(argv)
    drawn = render(args.prometheus, args.out, args.minutes, args.rate_window)
    for title, series in drawn.items():
        print(f"{series:3d} series  {title}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
