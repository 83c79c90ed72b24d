"""A second rnnserve server from a git ref (`--baseline main`), measured in the same run as this tree's.

Speed on a shared 2-core machine is comparable only side by side, so a target like "1.2x today's
main" needs today's main served in the same run. The ref's files are exported (`git archive`, which
leaves the repository's worktrees and branches alone) into the cache, once per commit, and its server runs on this environment's Python with the ref's
own code first on the import path (`launcher`): an import tree of symlinks lays its folders out as the ref's
pyproject maps them into `rnnserve` (server/ as rnnserve.server, ...), so no second venv is
needed while the ref's dependencies are this tree's.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from bench.load import connect
from bench.processes import ServerProcess
from bench.sizes import Sizes
from bench.stats import Rounds
from bench.workloads import stream_steps, unary_steps

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = "W2-baseline"


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


class Baseline:
    """The ref's server, started afresh for each round of W2 at every session count, stream and unary."""

    def __init__(self, ref: str, cache: Path, server_args: list[str]):
        self.commit, worktree = checkout(ref, cache)
        self._argv = [sys.executable, "-c", launcher(import_tree(worktree)), *server_args]
        self._logs = cache / "logs"

    async def measure_round(self, number: int, sizes: Sizes, tokens: list[int], rounds: Rounds) -> None:
        with ServerProcess(self._argv, self._logs / f"baseline-round{number}.log") as process:
            async with connect(process) as server:
                for count in sizes.batches:
                    for variant, steps in (("stream", stream_steps), ("unary", unary_steps)):
                        rounds.add(WORKLOAD, variant, count,
                                   await steps(server, count, sizes.w2_steps, sizes.warmup_steps, tokens))
