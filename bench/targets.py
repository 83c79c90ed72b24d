"""The targets of issue 4 (W6's of issue 11; W2 multi-2's and unary's of issue 15; issue 26's CPU per token
beyond the floors, rnnserve.client against raw streams, and this tree against a baseline ref: W2 1.2x faster, the
rest no worse), each a figure read against its floor from the same run, and issue 14's two busy models against
one, reported with no target yet.

They mirror ../shared/tools/targets.py (which reads the committed latest.json) so that a run
says at once where it stands, and latest.md shows every figure beside its floor and ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from bench.sizes import Sizes
from bench.stats import Row

MiB = 2**20


@dataclass(frozen=True)
class Verdict:
    """One line of the targets table; `ok` is None when a row it needs is missing. A figure shown beside its floor
    with no target to meet yet is not `judged`: its status is "reported", its `ok` None."""

    name: str
    figure: str
    floor: str
    ratio: str
    target: str
    ok: bool | None
    judged: bool = True

    @property
    def status(self) -> str:
        return {True: "met", False: "SHORT", None: "missing"}[self.ok] if self.judged else "reported"

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status}


Lookup = Callable[[str, str, int, str], float]
Check = Callable[[Lookup, Sizes], Verdict]


def _w2_stream(get: Lookup, sizes: Sizes) -> Verdict:
    n = sizes.most_sessions
    figure, floor = get("W2", "stream", n, "tokens_per_s"), get("F2", "echo", n, "messages_per_s")
    return Verdict(f"W2 stream, {n} sessions", f"{figure:,.0f} tokens/s", f"F2 echo: {floor:,.0f} messages/s",
                   f"{figure / floor:.0%}", ">= 50% of F2 and >= 7,000 tokens/s",
                   figure >= 0.5 * floor and figure >= 7000)


def _against_f1(get: Lookup, sizes: Sizes, variant: str, name: str, share: float) -> Verdict:
    """W2's StepBatch `variant` at the most sessions against onnxruntime alone at that batch."""
    n = sizes.most_sessions
    figure, floor = get("W2", variant, n, "tokens_per_s"), get("F1", "ort", n, "tokens_per_s")
    return Verdict(name, f"{figure:,.0f} tokens/s", f"F1 batch {n}: {floor:,.0f} tokens/s", f"{figure / floor:.0%}",
                   f">= {share:.0%} of F1", figure >= share * floor)


def _w2_multi(get: Lookup, sizes: Sizes) -> Verdict:
    return _against_f1(get, sizes, "multi", f"W2 multi, {sizes.most_sessions} sessions per message", 0.6)


def _w2_multi_2(get: Lookup, sizes: Sizes) -> Verdict:
    """Issue 15: a gateway that keeps two messages in flight, so that its work overlaps the model's."""
    n = sizes.most_sessions
    return _against_f1(get, sizes, "multi-2", f"W2 multi-2, {n} sessions in 2 messages in flight", 0.7)


def _w2_unary(get: Lookup, sizes: Sizes) -> Verdict:
    """Issue 15: a Step call per step should cost little more than a stream per session."""
    n = sizes.most_sessions
    figure, floor = get("W2", "unary", n, "tokens_per_s"), get("W2", "stream", n, "tokens_per_s")
    return Verdict(f"W2 unary, {n} sessions", f"{figure:,.0f} tokens/s", f"W2 stream: {floor:,.0f} tokens/s",
                   f"{figure / floor:.0%}", ">= 70% of W2 stream", figure >= 0.7 * floor)


def _w1(get: Lookup, sizes: Sizes) -> Verdict:
    figure = get("W1", "stream", 1, "p50_us")
    floor = get("F1", "ort", 1, "p50_us") + get("F2", "echo", 1, "p50_us")
    paced = get("F1", "ort-paced", 1, "p50_us")  # shown beside the floor: what a model call costs at a served pace
    return Verdict("W1 median step latency", f"{figure:,.0f} us",
                   f"F1(1) + F2(1): {floor:,.0f} us (F1(1) 1 ms apart: {paced:,.0f} us)",
                   f"{figure / floor:.2f}x", f"<= floor + 150 us = {floor + 150:,.0f} us", figure <= floor + 150)


def _w3(get: Lookup, sizes: Sizes) -> Verdict:
    first, last = get("W3", "stateful", 1, "first100_p50_us"), get("W3", "stateful", 1, "last100_p50_us")
    ratio, stateless = get("W3", "stateful", 1, "last_first_ratio"), get("W3", "stateless", 1, "last_first_ratio")
    return Verdict(f"W3 last/first {sizes.w3_window} steps of {sizes.w3_steps:,}", f"{last:,.0f} / {first:,.0f} us",
                   f"stateless baseline ratio: {stateless:.2f}", f"{ratio:.2f}", "<= 1.1", ratio <= 1.1)


def _w4(get: Lookup, sizes: Sizes) -> Verdict:
    figure, floor = get("W4", "prefill", 1, "tokens_per_s"), get("F1", "prefill", 1, "tokens_per_s")
    return Verdict(f"W4 prefill of {sizes.prefill_tokens:,} tokens", f"{figure:,.0f} tokens/s",
                   f"F1 prefill: {floor:,.0f} tokens/s", f"{figure / floor:.0%}", ">= 80% of F1", figure >= 0.8 * floor)


def _w5(get: Lookup, sizes: Sizes) -> Verdict:
    n = sizes.w5_sessions
    figure, raw = get("W5", "idle", n, "rss_bytes"), get("W5", "idle", n, "raw_state_bytes")
    limit = 1.3 * raw + 200 * MiB
    return Verdict(f"W5 resident memory, {n:,} idle sessions", f"{figure / MiB:,.0f} MiB",
                   f"raw state: {raw / MiB:,.0f} MiB", f"{figure / raw:.2f}x",
                   f"<= 1.3 x raw + 200 MiB = {limit / MiB:,.0f} MiB", figure <= limit)


def _w6(get: Lookup, sizes: Sizes) -> Verdict:
    cached, cold = get("W6", "cached", 1, "p50_us"), get("W6", "cold", 1, "p50_us")
    ratio = get("W6", "cached", 1, "cold_cached_ratio")
    return Verdict(f"W6 first prediction, {sizes.prefill_tokens:,}-token prompt cached", f"{cached:,.0f} us",
                   f"cold prefill: {cold:,.0f} us", f"{ratio:.1f}x faster", ">= 20x faster than cold", ratio >= 20)


def _m1(get: Lookup, sizes: Sizes) -> Verdict:
    n = sizes.most_sessions
    ratios = {transport: get("M1", transport, n, "on_off_ratio") for transport in ("stream", "unary")}
    return Verdict(f"M1 metrics on, {n} sessions", ", ".join(f"{t} {r:.0%}" for t, r in ratios.items()),
                   "the same server with metrics off", f"{min(ratios.values()):.0%}", ">= 95% of metrics off",
                   min(ratios.values()) >= 0.95)


def _two_models(get: Lookup, sizes: Sizes) -> Verdict:
    """Issue 14: a server of two models, both busy, against a server of one, at the same sessions in all.

    Reported, not judged: on 2 cores the two model threads may overlap each other's Python work or
    contend for the cores, and full runs have yet to show which wins (bench/models.py).
    """
    n, workload = sizes.most_sessions, "W2-models"
    figure, floor, one_busy = (get(workload, f"stream-{variant}", n, "tokens_per_s")
                               for variant in ("two-busy", "one-model", "one-busy"))
    ratio = get(workload, "stream", n, "two_busy_one_model_ratio")
    return Verdict(f"W2 two models busy, {n} sessions (half on each)", f"{figure:,.0f} tokens/s",
                   f"one-model server: {floor:,.0f} tokens/s (two-model server, one busy: {one_busy:,.0f})",
                   f"{ratio:.0%}", "none yet (reported)", None, judged=False)


def _cpu(get: Lookup, workload: str, variant: str, n: int) -> float:
    return get(workload, variant, n, "server_cpu_us_per_token")


def _cpu_beyond(name: str, figure: float, floors: dict[str, float], allowance: float) -> Verdict:
    """A server's CPU per token against the sum of its floors' plus `allowance` microseconds."""
    floor = sum(floors.values())
    shown = " + ".join(f"{label} {value:,.0f}" for label, value in floors.items())
    return Verdict(name, f"{figure:,.0f} us CPU/token", f"{shown} = {floor:,.0f} us", f"+{figure - floor:,.0f} us",
                   f"<= floor + {allowance:.0f} us = {floor + allowance:,.0f} us", figure <= floor + allowance)


def _unary_cpu(get: Lookup, sizes: Sizes) -> Verdict:
    """Issue 26: a Step call costs the server what grpc.aio's unary floor and the model need, and 60 us."""
    n = sizes.most_sessions
    return _cpu_beyond(f"W2 unary server CPU, {n} sessions", _cpu(get, "W2", "unary", n),
                       {f"F2u({n})": _cpu(get, "F2u", "unary-echo", n), f"F1({n})": get("F1", "ort", n, "cpu_us_per_token")},
                       60)


def _stream_cpu(get: Lookup, sizes: Sizes) -> Verdict:
    n = sizes.most_sessions
    return _cpu_beyond(f"W2 stream server CPU, {n} sessions", _cpu(get, "W2", "stream", n),
                       {f"F2({n})": _cpu(get, "F2", "echo", n), f"F1({n})": get("F1", "ort", n, "cpu_us_per_token")},
                       30)


def _batch_cpu(get: Lookup, sizes: Sizes) -> Verdict:
    n = sizes.most_sessions
    return _cpu_beyond(f"W2 multi (StepBatch) server CPU, {n} sessions", _cpu(get, "W2", "multi", n),
                       {f"F1({n})": get("F1", "ort", n, "cpu_us_per_token")}, 15)


def _w1_cpu(get: Lookup, sizes: Sizes) -> Verdict:
    return _cpu_beyond("W1 server CPU, one session", _cpu(get, "W1", "stream", 1),
                       {"F2(1)": _cpu(get, "F2", "echo", 1), "F1(1)": get("F1", "ort", 1, "cpu_us_per_token")}, 100)


def _at_every_count(name: str, sizes: Sizes, ratio_at: Callable[[int], float], share: float, against: str,
                    extra: str = "") -> Verdict:
    ratios = {n: ratio_at(n) for n in sizes.batches}
    shown = " / ".join(f"{ratios[n]:.2f}" for n in sizes.batches)
    return Verdict(name, f"{shown} at {' / '.join(map(str, sizes.batches))} sessions{extra}", against,
                   f"{min(ratios.values()):.2f} (lowest)", f">= {share:.2f}x at every count",
                   min(ratios.values()) >= share)


def _client(get: Lookup, sizes: Sizes) -> Verdict:
    """Issue 26: services step through rnnserve.client's `session.step()`; it should cost about what raw streams do.
    Shown beside: the client library's own CPU per step, and the raw stubs' the load generator uses."""
    n = sizes.most_sessions
    client_cpu, raw_cpu = (get("W2", variant, n, "client_cpu_us_per_token") for variant in ("client", "stream"))
    unary_cpu = get("W2", "client-unary", n, "client_cpu_us_per_token")
    return _at_every_count(
        "W2 through rnnserve.client, tokens/s against raw streams", sizes,
        lambda count: get("W2", "client", count, "tokens_per_s") / get("W2", "stream", count, "tokens_per_s"), 0.9,
        f"W2 stream (raw stubs); client CPU/token at {n}: library {client_cpu:,.0f} us (unary=True "
        f"{unary_cpu:,.0f}), raw stream stubs {raw_cpu:,.0f} us")


# "No worse than the ref" reads a figure within this share of the ref's, in the figure's worse direction. The two
# are measured minutes apart at most on a shared 2-core machine, where runs minutes apart differ by 10-20%
# (docs/BENCHMARKS.md): a stricter rule would read the machine's spells as regressions.
NO_WORSE_MARGIN = 0.10


@dataclass(frozen=True)
class Compared:
    """A figure read against the same figure of the baseline ref's server (its rows' workload + "-baseline")."""

    name: str
    workload: str
    variant: str
    metric: str
    lower_is_better: bool
    shown: Callable[[float], str]
    sessions: Callable[[Sizes], int] = lambda sizes: 1


def _us(value: float) -> str:
    return f"{value:,.0f} us"


COMPARED = [
    Compared("W1 median step latency", "W1", "stream", "p50_us", True, _us),
    Compared("W1 server CPU per token", "W1", "stream", "server_cpu_us_per_token", True, _us),
    Compared("W3 last/first ratio", "W3", "stateful", "last_first_ratio", True, "{:.2f}".format),
    Compared("W4 prefill", "W4", "prefill", "tokens_per_s", False, "{:,.0f} tokens/s".format),
    Compared("W5 resident memory of idle sessions", "W5", "idle", "rss_bytes", True,
             lambda value: f"{value / MiB:,.0f} MiB", lambda sizes: sizes.w5_sessions),
    Compared("W6 cached against cold first prediction", "W6", "cached", "cold_cached_ratio", False,
             "{:.1f}x faster".format),
    *(Compared(f"M1 {transport} metrics on/off", "M1", transport, "on_off_ratio", False, "{:.0%}".format,
               lambda sizes: sizes.most_sessions) for transport in ("stream", "unary")),
    *(Compared(f"R1 {transport} through HAProxy", "R1", f"{transport}-proxy", "tokens_per_s", False,
               "{:,.0f} tokens/s".format, lambda sizes: sizes.most_sessions) for transport in ("unary", "stream")),
    Compared("R3 unary, write-through every 16 tokens", "R3", "every-16", "tokens_per_s", False,
             "{:,.0f} tokens/s".format, lambda sizes: sizes.most_sessions),
]


def _not_measured(name: str, target: str) -> Verdict:
    return Verdict(name, "not measured", "run with --baseline REF", "", target, None, judged=False)


def _no_worse(compared: Compared, ref: str) -> Check:
    """This tree's figure against the ref's from the same run: met within NO_WORSE_MARGIN, SHORT beyond."""
    bound = 1 + NO_WORSE_MARGIN if compared.lower_is_better else 1 - NO_WORSE_MARGIN
    sign = "<=" if compared.lower_is_better else ">="
    target = f"{sign} {bound:.2f}x {ref}'s (no worse, {NO_WORSE_MARGIN:.0%} margin)"

    def check(get: Lookup, sizes: Sizes) -> Verdict:
        name, key = f"{compared.name} against {ref}", (compared.variant, compared.sessions(sizes), compared.metric)
        try:
            theirs = get(compared.workload + "-baseline", *key)
        except KeyError:
            return _not_measured(name, target)
        here = get(compared.workload, *key)
        ratio = here / theirs
        return Verdict(name, compared.shown(here), f"{ref}: {compared.shown(theirs)}", f"{ratio:.2f}x", target,
                       ratio <= bound if compared.lower_is_better else ratio >= bound)

    return check


def _faster(variant: str, ref: str) -> Check:
    """Issue 26's W2 targets: this tree's tokens/s at every session count >= 1.2x the ref's in the same run."""
    def check(get: Lookup, sizes: Sizes) -> Verdict:
        name, target = f"W2 {variant} tokens/s against {ref}", ">= 1.20x at every count"
        try:
            get("W2-baseline", variant, sizes.most_sessions, "tokens_per_s")
        except KeyError:
            return _not_measured(name, target)
        return _at_every_count(
            name, sizes, lambda n: get("W2", variant, n, "tokens_per_s") / get("W2-baseline", variant, n,
                                                                              "tokens_per_s"),
            1.2, f"{ref}'s W2 {variant}, same run")

    return check


CHECKS = {"W2 stream": _w2_stream, "W2 multi": _w2_multi, "W2 multi-2": _w2_multi_2, "W2 unary": _w2_unary,
          "W1": _w1, "W3": _w3, "W4": _w4, "W5": _w5, "W6": _w6, "M1": _m1, "W2 two models": _two_models,
          "W2 unary CPU": _unary_cpu, "W2 stream CPU": _stream_cpu, "W2 multi CPU": _batch_cpu, "W1 CPU": _w1_cpu,
          "W2 client": _client}


def baseline_checks(ref: str | None) -> dict[str, Check]:
    """The rows read against the baseline ref (`--baseline REF`), named after it; without one, each says so."""
    shown = ref or "the baseline ref"
    return {f"W2 {variant} baseline": _faster(variant, shown) for variant in ("unary", "stream")} | {
        f"{compared.name} baseline": _no_worse(compared, shown) for compared in COMPARED}


def verdicts(rows: list[Row], sizes: Sizes, baseline_ref: str | None = None) -> list[Verdict]:
    """Every target's verdict; those read against the baseline ref name `baseline_ref` (`--baseline`)."""
    values = {(r.workload, r.variant, r.sessions, r.metric): r.value for r in rows}

    def get(workload: str, variant: str, sessions: int, metric: str) -> float:
        return values[(workload, variant, sessions, metric)]

    found = []
    for name, check in (CHECKS | baseline_checks(baseline_ref)).items():
        try:
            found.append(check(get, sizes))
        except KeyError as missing:
            found.append(Verdict(name, "", "", "", f"row {'/'.join(map(str, missing.args[0]))} missing", None))
    return found
