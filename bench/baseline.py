"""A second rnnserve server from a git ref (`--baseline main`), measured in the same run as this tree's.

Speed on a shared 2-core machine is comparable only side by side, so a target like "1.2x today's
main" needs today's main served in the same run. The ref's files are exported (`git archive`, which
leaves the repository's worktrees and branches alone) into the cache, once per commit, and its server runs
on this environment's Python with the ref's own code first on the import path (`launcher`): an import tree
of symlinks lays its folders out as the ref's pyproject maps them into `rnnserve` (server/ as
rnnserve.server, ...), so no second venv is needed while the ref's dependencies are this tree's. The ref's
server is measured by this tree's workload functions, each stage right after this tree's own (`Baseline`),
so that "no worse than main" reads two figures that met the same spells of the shared machine.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.load import connect
from bench.metrics_cost import m1
from bench.operations import w6
from bench.processes import ServerProcess
from bench.replicas import COMPOSE_WRITE_THROUGH, RedisProcess, r1_proxy, r3_write_through
from bench.sizes import Sizes
from bench.stats import Results, Rounds
from bench.workloads import W1_TO_W4_FLAGS, stream_steps, unary_steps, w3, w4, w5

ROOT = Path(__file__).resolve().parents[1]
# The ref's rows are named as this tree's, their workload followed by this (W2-baseline, W3-baseline, ...).
SUFFIX = "-baseline"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def checkout(ref: str, cache: Path) -> tuple[str, Path]:
    """The ref's commit and a copy of its files under `cache`, exported if not there yet."""
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    worktree = cache / f"baseline-{commit[:12]}"
    if not (worktree / "pyproject.toml").is_file():
        worktree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(worktree)], input=archive, check=True)
    return commit, worktree


def import_tree(worktree: Path) -> Path:
    """A folder to put first on PYTHONPATH: `rnnserve` as the worktree's pyproject maps its packages."""
    mapping = tomllib.loads((worktree / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    tree = worktree.parent / f"{worktree.name}-import"
    package = tree / "rnnserve"
    package.mkdir(parents=True, exist_ok=True)
    for child in (worktree / mapping["rnnserve"]).iterdir():  # the top package's own modules and data
        _link(package / child.name, child)
    for name, folder in mapping.items():
        if name != "rnnserve":
            _link(tree.joinpath(*name.split(".")), worktree / folder)
    return tree


def launcher(tree: Path, module: str = "rnnserve.server.main") -> str:
    """`python -c` code running `module`'s main from `tree` (an `import_tree`): first on sys.path, ahead of the
    current folder, whose rnnserve/ (this tree's) `-c` would otherwise put first."""
    return f"import sys; sys.path.insert(0, {str(tree)!r}); from {module} import main; main()"


def _link(link: Path, target: Path) -> None:
    if not link.is_symlink():
        link.symlink_to(target.resolve())


def as_baseline(measured: Results, results: Results) -> None:
    """`measured`'s rows (taken on the ref's server by this tree's workload functions) into `results`, each
    under its workload's name and SUFFIX, beside this tree's."""
    for row in measured.rows:
        results.add(row.workload + SUFFIX, row.variant, row.sessions, row.metric, row.value, row.unit)


class Baseline:
    """The ref's server, measured by the same workload functions as this tree's, each next to this tree's own:
    W1 and W2 (stream and unary at every session count) on a fresh server after each headline round, W3 and W4
    in the first of them, and W6, W5, one round of M1 and two of the replica stage's each on servers of their own."""

    def __init__(self, ref: str, cache: Path, server_args: list[str]):
        self.ref = ref
        self.commit, worktree = checkout(ref, cache)
        self._command = [sys.executable, "-c", launcher(import_tree(worktree)), *server_args]
        self._logs = cache / "logs" / "baseline"

    def _server(self, flags: Sequence[str], log: str) -> ServerProcess:
        return ServerProcess([*self._command, *flags], self._logs / f"{log}.log")

    async def measure_round(self, number: int, sizes: Sizes, tokens: list[int], rounds: Rounds,
                            results: Results) -> None:
        """Round `number` of W1 and W2; the first round's server keeps no prefix-state cache, as this tree's
        W1-W4 server, and then runs W3 (whose stateless side must read every prefix whole) and W4."""
        first = number == 1
        with self._server(W1_TO_W4_FLAGS if first else [], f"round{number}") as process:
            async with connect(process) as server:
                rounds.add("W1" + SUFFIX, "stream", 1,
                           await stream_steps(server, 1, sizes.w1_steps, sizes.warmup_steps, tokens))
                for count in sizes.batches:
                    for variant, steps in (("stream", stream_steps), ("unary", unary_steps)):
                        rounds.add("W2" + SUFFIX, variant, count,
                                   await steps(server, count, sizes.w2_steps, sizes.warmup_steps, tokens))
                if first:
                    measured = Results()
                    await w3(server, sizes, tokens, measured)
                    await w4(server, sizes, tokens, measured)
                    as_baseline(measured, results)

    async def w6(self, sizes: Sizes, tokens: list[int], results: Results) -> None:
        """W6 on a server of its own with the prefix-state cache on, as this tree's session operations server."""
        measured = Results()
        with self._server([], "w6") as process:
            async with connect(process) as server:
                await w6(server, sizes, tokens, measured)
        as_baseline(measured, results)

    async def w5(self, sizes: Sizes, tokens: list[int], state_bytes: int, results: Results) -> None:
        measured = Results()
        with self._server(["--max-sessions", str(sizes.w5_sessions + 1)], "w5") as process:
            await w5(process, sizes, tokens, state_bytes, measured)
        as_baseline(measured, results)

    async def m1(self, sizes: Sizes, tokens: list[int], results: Results, progress: Callable[[str], None]) -> None:
        """One round of M1 (a server with metrics off, then one with them on): this tree's takes three, at about
        90 s each in a full run; its figure then reads against one round's pair, as noisy as a round is."""
        measured = Results()
        await m1(self._command, dataclasses.replace(sizes, metrics_rounds=1), tokens, self._logs, measured, progress)
        as_baseline(measured, results)

    async def replicas(self, sizes: Sizes, tokens: list[int], results: Results) -> None:
        """R1 (HAProxy against direct) and R3 at the compose file's write-through every 16 tokens, with a Redis of
        their own. Not R2, which times an engine inside the bench's process (this tree's code, whatever the ref),
        nor R4, which waits out the hibernation of W5's sessions, nor R3's other settings: a minute or more each."""
        measured = Results()
        workdir = self._logs / "replicas"
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="rnnserve-bench-") as scratch, RedisProcess(Path(scratch)) as redis:
            await r1_proxy(self._command, redis.url, sizes, tokens, workdir, measured)
            redis.flush()
            await r3_write_through(self._command, redis.url, sizes, tokens, workdir, measured, (COMPOSE_WRITE_THROUGH,))
        as_baseline(measured, results)
