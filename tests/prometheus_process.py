"""A real Prometheus server for tests: the Debian binary on a loopback port, data in a temporary folder.

It scrapes with the deploy/ scrape configuration, only pointed at the test's target and made
faster, so the configuration the compose stack ships is the one exercised here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType

import yaml
from serving import end_process, free_port
from serving import end_process, free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
BINARY = shutil.which("prometheus") or "/usr/bin/prometheus"
STARTUP_SECONDS = 20.0


def scrape_config(target: str, interval: str) -> dict:
    """deploy/prometheus/prometheus.yml, scraping `target` every `interval`."""
    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    return config


class PrometheusProcess:
    """`with PrometheusProcess(workdir, target) as prometheus:` scrapes `target` until the block ends."""

    def __init__(self, workdir: Path, target: str, interval: str = "1s"):
        self.workdir = workdir
        self.config = scrape_config(target, interval)
        self.url = f"http://127.0.0.1:{free_port()}"
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> PrometheusProcess:
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config))
        self.log = self.workdir / "prometheus.log"
        with self.log.open("wb") as sink:
            self._process = subprocess.Popen(
                [BINARY, f"--config.file={config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"],
                stdout=sink, stderr=subprocess.STDOUT)
        self._wait_until_ready()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        end_process(self._process)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"prometheus did not become ready; its log:\n{self.log.read_text()[-3000:]}")

    def api(self, path: str, **params: object) -> object:
        """GET /api/v1/<path>; the `data` of a successful answer."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str, **params: object) -> dict[frozenset, float]:
        """An instant PromQL query (at `time=` if given): each series' labels (a frozenset of pairs) and value."""
        data = self.api("query", query=expr, **params)
        return {frozenset(series["metric"].items()): float(series["value"][1]) for series in data["result"]}

    def wait_for(self, expr: str, timeout: float = 15.0) -> dict[frozenset, float]:
        """The first non-empty answer to `expr` within `timeout` seconds: the scrapes need to catch up.

        With a comparison (`sum(x) == 3`) it waits for a value, since PromQL drops what compares false.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.query(expr)
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.25)
