"""`python -m bench`: the floors and the reference workloads in one run, and the report.

Order matters on a 2-core machine: each stage has the cores to itself. F1 runs in this process
before any server exists; the echo server (F2) is stopped before rnnserve-server starts; M1
starts its own servers, with metrics and without, one at a time; W5 gets a fresh server so that
its baseline is a server that never held a session, and the session operations and W6 one that
holds only theirs (`--only operations` runs that stage alone), and so do each batcher setting
(`--only batching`), the int8 copy of the reference model (`--only int8`), issue 14's servers
of one model and of two, both busy (`--only models`), and issue 12's scale-out stage, with Redis
and HAProxy as real peers (`--only replicas`). F1 and the loops
the targets read most (W1, W2 at the most sessions, and F2 at one stream and the most, their
floors) are measured in rounds spread over the run, each figure their median. With `--baseline REF`, a
server of that ref's code follows this tree's in each stage it shares (bench/baseline.py).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from rnnserve.server.settings import parse_settings

from bench import plots
from bench.baseline import Baseline
from bench.batching import batching
from bench.floors import F1, f2
from bench.int8 import int8
from bench.kserve import V2_FLAGS, kserve_v2
from bench.metrics_cost import m1
from bench.models import FLAGS as MODELS_FLAGS
from bench.models import two_models
from bench.operations import session_operations
from bench.processes import ServerProcess
from bench.reference import reference_bundle
from bench.replicas import COMPOSE_WRITE_THROUGH, scale_out
from bench.report import Run, machine, write_json, write_markdown
from bench.sizes import PRESETS, Sizes
from bench.stats import Results, Rounds
from bench.targets import verdicts
from bench.web import web
from bench.workloads import W1_TO_W4_FLAGS, headline_round, w1_to_w4, w5

HERE = Path(__file__).resolve().parent
TOKEN_SEED = 1


class Progress:
    """Prints each stage with the time since the run began, so a long run shows where it is."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, stage: str) -> None:
        print(f"[{self.seconds:6.1f} s] {stage}", file=sys.stderr, flush=True)


def reference_tokens(sizes: Sizes) -> list[int]:
    """A fixed random token sequence, long enough for the longest session and prompt; never the unknown id 0."""
    length = max(sizes.w3_steps, sizes.prefill_tokens, *sizes.batches)
    return [int(t) for t in np.random.default_rng(TOKEN_SEED).integers(1, sizes.model.vocab_size, length)]


def server_command(bundle_path: Path, flags: list[str], serves: str = "--bundle") -> list[str]:
    """The installed `rnnserve-server` entry point (the one users run) on an ephemeral loopback port,
    serving the bundle at `bundle_path` (given relative, so that the command shown reads short), or with
    `serves="--model-repository"` the model repository there."""
    executable = shutil.which("rnnserve-server", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if executable is None:
        raise SystemExit("rnnserve-server is not installed in this environment (pip install -e .)")
    return [executable, serves, os.path.relpath(bundle_path), "--listen", "127.0.0.1:0", *flags]


async def measure(sizes: Sizes, server_flags: list[str], cache: Path, progress: Progress,
                  only: str | None, baseline_ref: str | None = None) -> tuple[Results, str]:
    """Every floor and workload in turn, or the `only` stage; returns the results and the server command used.
    With `baseline_ref`, that ref's server too, each of its stages right after this tree's own: W1 and W2 at
    every session count after each round of the headline, W3 and W4 in the first, W6, M1 and W5."""
    results = Results()
    logs = cache / "logs"
    progress("reference bundle")
    bundle = reference_bundle(cache, sizes.model, sizes.model_seed)
    tokens = reference_tokens(sizes)
    settings = parse_settings(server_flags)
    command = server_command(bundle.path, server_flags)
    shown = shlex.join([Path(command[0]).name, *command[1:]])

    async def operations() -> None:
        await session_operations(command, sizes, tokens, settings.rewind_depth, logs, results, progress)

    async def batching_settings() -> None:
        await batching(command, sizes, tokens, logs, results, progress)

    async def int8_copy() -> None:
        await int8(functools.partial(server_command, flags=server_flags), bundle,
                   settings.ort_threads, settings.ort_spins, sizes, tokens, logs, results, progress)

    async def models() -> None:
        await two_models(functools.partial(server_command, flags=[*server_flags, *MODELS_FLAGS],
                                           serves="--model-repository"),
                         bundle, sizes, tokens, logs, results, progress)

    async def replicas() -> None:
        await scale_out(command, bundle, sizes, tokens, logs, results, progress)

    async def v2() -> None:
        progress("v2 face: W2 through tritonclient's asyncio gRPC client at 1, 64 and 256 sequences, beside the "
                 "native stream (fresh server)")
        with ServerProcess([*command, *W1_TO_W4_FLAGS, *V2_FLAGS], logs / "server-v2.log") as server:
            await kserve_v2(server, bundle.name, sizes, tokens, results)

    stages = {"operations": operations, "batching": batching_settings, "int8": int8_copy, "models": models,
              "replicas": replicas, "v2": v2}
    if only is not None:
        await stages[only]()
        return results, shown
    f1 = F1(bundle, settings.ort_threads, settings.ort_spins, sizes, tokens)

    def f1_round() -> None:  # taken at three points of the run, while the preset wants rounds
        if f1.rounds_left:
            progress(f"F1 onnxruntime in-process, round {sizes.f1_rounds - f1.rounds_left + 1} of {sizes.f1_rounds}")
            f1.measure_round()

    baseline = None if baseline_ref is None else Baseline(baseline_ref, cache, command[1:])

    def on_baseline(what: str) -> bool:
        """Whether there is a baseline to measure `what` on, shown as the next stage if there is."""
        if baseline is not None:
            progress(f"{what} on {baseline_ref} ({baseline.commit[:12]}, fresh server)")
        return baseline is not None

    async def baseline_round(number: int) -> None:
        also = ", W3 and W4" if number == 1 else ""
        if on_baseline(f"W1 and W2 stream and unary at every session count{also}, round {number}"):
            await baseline.measure_round(number, sizes, tokens, rounds, results)

    f1_round()
    progress("F2 grpc.aio echo server")
    rounds, later_rounds = Rounds(), iter(range(2, sizes.headline_rounds + 1))
    await f2(sizes, tokens, settings.event_loop, logs / "echo.log", results, rounds, sizes.batches)

    async def headline() -> None:  # rounds 2 and 3, while the preset wants them: after M1, after W5
        number = next(later_rounds, None)
        if number is not None:
            most = sizes.most_sessions
            progress(f"F2 at 1 and {most} streams, W1 latency and W2 at {most} sessions, round {number} of "
                     f"{sizes.headline_rounds} (fresh servers)")
            await f2(sizes, tokens, settings.event_loop, logs / f"echo-round{number}.log", results, rounds, (1, most))
            with ServerProcess(command, logs / f"server-round{number}.log") as server:
                await headline_round(server, sizes, tokens, rounds)
            await baseline_round(number)

    await baseline_round(1)  # each round of the baseline next to one of this tree's: the machine's spells are long
    with ServerProcess([*command, *W1_TO_W4_FLAGS], logs / "server.log") as server:
        await w1_to_w4(server, sizes, tokens, results, rounds, progress)
    await operations()
    if on_baseline("W6 cached prompts"):
        await baseline.w6(sizes, tokens, results)
    progress("HTTP face: W2 over HTTP/JSON at 1 and 64 sessions, time to first token over SSE and gRPC (fresh server)")
    http_command = [*command, *W1_TO_W4_FLAGS, "--http-listen", "127.0.0.1:0"]
    with ServerProcess(http_command, logs / "server-http.log") as server:
        await web(server, sizes, tokens, results)
    await v2()
    f1_round()
    await m1(command, sizes, tokens, logs, results, progress)
    if on_baseline("M1 metrics cost, one round"):
        await baseline.m1(sizes, tokens, results, progress)
    await headline()
    f1_round()
    f1.report(results)
    progress(f"W5 memory of {sizes.w5_sessions:,} idle sessions (fresh server)")
    with ServerProcess(command + ["--max-sessions", str(sizes.w5_sessions + 1)], logs / "server-w5.log") as server:
        await w5(server, sizes, tokens, bundle.state_bytes_per_session, results)
    if on_baseline(f"W5 memory of {sizes.w5_sessions:,} idle sessions"):
        await baseline.w5(sizes, tokens, bundle.state_bytes_per_session, results)
    await batching_settings()
    await int8_copy()
    await models()
    await headline()
    await replicas()
    if on_baseline(f"R1 through HAProxy and R3 write-through every {COMPOSE_WRITE_THROUGH} tokens, with Redis"):
        await baseline.replicas(sizes, tokens, results)
    rounds.report(results)
    return results, shown


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="every workload with small counts (a minute or two); not for committed figures")
    preset.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                        help="a tiny model and tiny counts, for tests (seconds)")
    parser.set_defaults(preset="full")
    parser.add_argument("--only", choices=["operations", "batching", "int8", "models", "replicas", "v2"], default=None,
                        help="run one stage alone: 'operations' is each session operation against a plain step and "
                             "W6 (cached prompts against cold), on a server of their own; 'batching' is W1 and W2 "
                             "unary on a server per batcher setting (fixed and adaptive waits, --loop-max-tokens 0); "
                             "'int8' is the int8 copy of the reference model: its F1, W1 and W2; 'models' is W2 "
                             "streams at the most sessions on a server of two models, both busy, beside a server "
                             "of one; 'replicas' is R1-R4 "
                             "(the proxy, hibernation, write-through, memory with Redis); 'v2' is W2 through the Open "
                             "Inference Protocol face with tritonclient's asyncio gRPC client, beside the native "
                             "stream. Its figures go to "
                             "<cache>/<preset>-<stage> unless --out says where, never over bench/results, and "
                             "no plots are drawn")
    parser.add_argument("--out", type=Path, default=None,
                        help="where latest.json, latest.md and the plots go (default: bench/results for a full "
                             "run, bench/.cache/<preset> otherwise, so that a smoke run never replaces "
                             "committed figures)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache", help="reference bundles and server logs")
    parser.add_argument("--baseline", metavar="REF", default=None,
                        help="also serve this git ref (e.g. main), exported into the cache, and measure it next to "
                             "this tree: W1 and W2 stream and unary at every session count after each headline "
                             "round, W3 and W4, W6, one round of M1, W5, and R1 and R3 (write-through every 16) "
                             "with Redis and HAProxy; the targets read W2 against it "
                             "(tokens/s >= 1.2x the ref's) and the rest as no worse than the ref's (within 10%%); "
                             "adds about 10 minutes to a full run")
    parser.add_argument("--server-args", default="",
                        help="extra rnnserve-server flags, e.g. '--max-queue-delay-us 200' (F1 follows "
                             "--ort-threads and --ort-spinning, the F2 echo server --event-loop)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes, server_flags = PRESETS[args.preset], shlex.split(args.server_args)
    label = f"{args.preset}-{args.only}" if args.only else args.preset  # a partial run never replaces the figures
    out = args.out or (HERE / "results" if label == "full" else args.cache / label)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    load_before = os.getloadavg()
    progress(f"{args.preset} run on {os.cpu_count()} cores, load average {load_before[0]:.2f}")
    results, server = asyncio.run(measure(sizes, server_flags, args.cache, progress, args.only, args.baseline))
    run = Run(label, shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])]),
              server, sizes, progress.seconds, machine(load_before, os.getloadavg()), results.rows,
              verdicts(results.rows, sizes, args.baseline))
    write_json(run, out / "latest.json")
    write_markdown(run, out / "latest.md")
    if args.only:
        progress(f"wrote {out}/latest.json, latest.md")
    else:
        plots.throughput(results.rows, out / "throughput.png")
        plots.latency(results, sizes.batches, out / "latency.png")
        progress(f"wrote {out}/latest.json, latest.md, throughput.png, latency.png")
    for verdict in run.verdicts:
        print(f"  {verdict.status:7} {verdict.name}: {verdict.figure}; {verdict.floor}; ratio {verdict.ratio}; "
              f"target {verdict.target}")
