"""Every rnnserve metric: declared here, recorded here, served from a registry the server hands in.

The rest of the server reports plain numbers (a batch's `BatchReport`, an RPC's method, code and
seconds, a removed session's length and age) and this module turns them into Prometheus series
under one prefix and one label scheme: `model` and `model_version` on everything about a
loaded model version (`ModelMetrics`), `method` and `code` on RPCs, `kind` on tokens, `reason` on ended sessions.

The per-token path stays cheap: a batch of any size is recorded with one observation per
histogram and one `inc(n)` per counter, label children are bound once here rather than looked up
per call, and what can be read when Prometheus scrapes (sessions held, their bytes) is read then.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from importlib import metadata

import grpc
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector,
                               disable_created_metrics, start_http_server)

from rnnserve.bundle import Bundle
from rnnserve.server.core.batcher import BatchReport
from rnnserve.server.core.sessions import Removal

PREFIX = "rnnserve"
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}  # 5 -> "NOT_FOUND"
OK = grpc.StatusCode.OK.value[0]
MODEL_LABELS = ("model", "model_version")

# A step of one session takes tens of microseconds to a few milliseconds; a prefill or a slow
# client can take seconds. Roughly three buckets per decade from 25 us to 5 s keep p50 and p99
# within a bucket's width of the truth on either end.
SECONDS_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Sessions live from one prompt to days of chat: tokens in powers of four up to about a million,
# age from a second to a day.
SESSION_TOKEN_BUCKETS = tuple(4.0**power for power in range(11))
SESSION_AGE_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86_400.0)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the configured maximum batch size, which is always a bucket of its own."""
    buckets = [1.0]
    while buckets[-1] < max_batch_size:
        buckets.append(min(2 * buckets[-1], float(max_batch_size)))
    return tuple(buckets)


class Metrics:
    """The server's metrics in `registry`; `model` binds the per-model series of one loaded version.

    Families are declared once, here; a loaded version gets its children through `ModelMetrics`,
    and its series leave the registry when it unloads (`ModelMetrics.forget`), so that reloading
    many versions does not grow the registry without bound.
    """

    def __init__(self, registry: CollectorRegistry, *, max_batch_size: int, max_sessions: int,
                 methods: Sequence[str] = ()):
        """`methods`: the RPC methods served, whose series start at zero so that rate() sees their first calls."""
        self.registry = registry

        def per_model(kind: type, name: str, documentation: str, *labels: str, **options: object):
            return kind(f"{PREFIX}_{name}", documentation, (*MODEL_LABELS, *labels), registry=registry, **options)

        Info(f"{PREFIX}_build", "The running rnnserve and the libraries it serves with.",
             registry=registry).info(build_labels())
        ProcessCollector(namespace=PREFIX, registry=registry)
        self.model_info = per_model(Gauge, "model_info", "1 for each loaded model version, with its recurrent cell "
                                    "and graph sha256.", "cell", "sha256")
        self.model_default = per_model(Gauge, "model_default", "1 for the version of each model that new sessions "
                                       "get when they name no version; 0 for the other loaded versions (those "
                                       "loaded as well, and those retiring: serving their running sessions only).")
        self._model_loads = per_model(Counter, "model_loads", "Model versions loaded (result=loaded) or refused "
                                      "by their checks (result=refused): from the repository at start, dropped in "
                                      "while serving, or by an Admin call.", "result")
        self._rpcs = Counter(f"{PREFIX}_rpcs", "Finished RPCs by method and gRPC status code.",
                             ("method", "code"), registry=registry)
        self._rpc_seconds = Histogram(
            f"{PREFIX}_rpc_duration_seconds",
            "RPC latency from arrival to the last response sent; for streaming methods the call's whole life.",
            ("method",), buckets=SECONDS_BUCKETS, registry=registry)
        # Bound children by (method, code): looking labels up costs more than recording the call.
        self._rpc_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        for method in methods:
            self._rpc_child(method, OK)
        self._in_band_errors = Counter(
            f"{PREFIX}_in_band_errors", "Steps of Stream and StepBatch calls answered with an error inside a "
            "response, by gRPC status code; the call itself goes on and ends OK.", ("code",), registry=registry)
        Gauge(f"{PREFIX}_sessions_limit", "The most sessions the server holds at once, all models together.",
              registry=registry).set(max_sessions)
        self.tokens = per_model(Counter, "tokens", "Tokens consumed by sessions: kind=step for single-token steps "
                                "(Step, Stream, StepBatch, Generate), kind=prefill for the tokens of longer inputs.",
                                "kind")
        self.first_prediction = per_model(
            Histogram, "time_to_first_prediction_seconds",
            "From a prompt's arrival (CreateSession with a prompt, or Generate) to its first prediction.",
            buckets=SECONDS_BUCKETS)
        self.batch_size = per_model(Histogram, "batch_size_steps", "Sessions' steps run in one model call.",
                                    buckets=batch_size_buckets(max_batch_size))
        self.queue_wait = per_model(Histogram, "queue_wait_seconds",
                                    "How long the oldest step of each model call waited for it.",
                                    buckets=SECONDS_BUCKETS)
        self.run_seconds = per_model(Histogram, "onnxruntime_run_seconds",
                                     "Time inside onnxruntime per model call.", buckets=SECONDS_BUCKETS)
        self.failed_batches = per_model(Counter, "model_call_failures",
                                        "Model calls that failed; none of their steps was applied.")
        self.created = per_model(Counter, "sessions_created", "Sessions created.")
        self.restored = per_model(Counter, "sessions_restored",
                                  "Sessions taken over from the snapshot at start or woken from the session store: "
                                  "with sessions_created, what sessions_active and sessions_ended add up to.")
        self.ended = per_model(Counter, "sessions_ended", "Sessions removed, by reason: closed, expired, evicted, or "
                               "moved to the session store (hibernated or handed over; taken back as "
                               "sessions_restored).", "reason")
        self.session_tokens = per_model(Histogram, "session_length_tokens",
                                        "Tokens a session had consumed when it was removed.",
                                        buckets=SESSION_TOKEN_BUCKETS)
        self.session_age = per_model(Histogram, "session_age_seconds", "A session's age when it was removed.",
                                     buckets=SESSION_AGE_BUCKETS)
        self.capacity_refusals = per_model(Counter, "capacity_refusals",
                                           "Sessions refused because the table was full (RESOURCE_EXHAUSTED).")
        self.active = per_model(Gauge, "sessions_active", "Sessions held now.")
        self.state_bytes = per_model(Gauge, "session_state_bytes",
                                     "Memory held by the state of the sessions held now.")
        self.prefix_hits = per_model(Counter, "prefix_cache_hits",
                                     "New sessions' prompts that started with a prompt in the prefix-state cache.")
        self.prefix_misses = per_model(Counter, "prefix_cache_misses",
                                       "New sessions' prompts that started with no cached prompt.")
        self.prefix_reused = per_model(Counter, "prefix_cache_reused_tokens",
                                       "Prompt tokens whose state came from the prefix-state cache, not the model.")
        self.prefix_entries = per_model(Gauge, "prefix_cache_entries",
                                        "Prompts held in the prefix-state cache, named states included.")
        self.prefix_bytes = per_model(Gauge, "prefix_cache_bytes",
                                      "Memory held by the prefix-state cache's evictable entries.")
        self._declare_store_metrics(registry)

    def model(self, bundle: Bundle) -> ModelMetrics:
        """The series of one loaded version of a model."""
        return ModelMetrics(self, bundle)

    def record_model_load(self, name: str, version: str, loaded: bool) -> None:
        self._model_loads.labels(name, version, "loaded" if loaded else "refused").inc()

    def _declare_store_metrics(self, registry: CollectorRegistry) -> None:
        self._store_up = Gauge(f"{PREFIX}_session_store_up", "1 while the session store (Redis, --redis-url) answers, "
                               "0 while it cannot be reached: sessions held keep serving, hibernation pauses.",
                               registry=registry)
        self._store_writes = Counter(f"{PREFIX}_session_store_writes", "Sessions written to the session store: "
                                     "registrations, write-through, hibernation and hand-off.", registry=registry)
        self._store_write_seconds = Histogram(f"{PREFIX}_session_store_write_seconds",
                                              "One round trip of writes to the session store, however many sessions.",
                                              buckets=SECONDS_BUCKETS, registry=registry)
        self._hibernated = Counter(f"{PREFIX}_sessions_hibernated", "Sessions put at rest in the session store "
                                   "(idle, or handed over by a draining replica).", registry=registry)
        self._lost = Counter(f"{PREFIX}_sessions_lost", "Sessions this replica put at rest that the session store came "
                             "back without (restarted, without persistence): answered SESSION_LOST from then on.",
                             registry=registry)

    def record_store_up(self, up: bool) -> None:
        self._store_up.set(1 if up else 0)

    def record_store_write(self, sessions: int, seconds: float) -> None:
        self._store_writes.inc(sessions)
        self._store_write_seconds.observe(seconds)

    def record_hibernated(self, sessions: int) -> None:
        self._hibernated.inc(sessions)

    def record_sessions_lost(self, sessions: int) -> None:
        self._lost.inc(sessions)

    def _rpc_child(self, method: str, code: int) -> tuple[Counter, Histogram]:
        children = self._rpc_children.get((method, code))
        if children is None:
            children = self._rpcs.labels(method, CODE_NAMES[code]), self._rpc_seconds.labels(method)
            self._rpc_children[method, code] = children
        return children

    def record_rpc(self, method: str, code: int, seconds: float) -> None:
        """A finished call of `method`, answered with status `code` (google.rpc.Code) after `seconds`."""
        count, duration = self._rpc_child(method, code)
        count.inc()
        duration.observe(seconds)

    def record_refused_rpc(self, method: str, code: int) -> None:
        """A call of `method` refused with `code` before it reached the service (a missing token):
        counted with the others; its duration, none of the service's time, is not observed."""
        self._rpc_child(method, code)[0].inc()

    def record_in_band_error(self, code: int) -> None:
        """A step of a Stream or StepBatch answered with an error inside a response of a call that goes on."""
        self._in_band_errors.labels(CODE_NAMES[code]).inc()


class ModelMetrics:
    """The series of one loaded model version, bound once: the batcher, the session table and the prefix
    cache report to it, as plain numbers."""

    def __init__(self, metrics: Metrics, bundle: Bundle):
        self._metrics = metrics
        self._labels = (bundle.name, bundle.version)
        self._info = (bundle.cell, bundle.sha256)
        labels = self._labels
        metrics.model_info.labels(*labels, *self._info).set(1)
        self._default = metrics.model_default.labels(*labels)
        self._step_tokens = metrics.tokens.labels(*labels, "step")
        self._prefill_tokens = metrics.tokens.labels(*labels, "prefill")
        self._first_prediction = metrics.first_prediction.labels(*labels)
        self._batch_size = metrics.batch_size.labels(*labels)
        self._queue_wait = metrics.queue_wait.labels(*labels)
        self._run_seconds = metrics.run_seconds.labels(*labels)
        self._failed_batches = metrics.failed_batches.labels(*labels)
        self._created = metrics.created.labels(*labels)
        self._restored = metrics.restored.labels(*labels)
        self._ended = {reason.value: metrics.ended.labels(*labels, reason.value) for reason in Removal}
        self._session_tokens = metrics.session_tokens.labels(*labels)
        self._session_age = metrics.session_age.labels(*labels)
        self._capacity_refusals = metrics.capacity_refusals.labels(*labels)
        self._active = metrics.active.labels(*labels)
        self._state_bytes = metrics.state_bytes.labels(*labels)
        self._prefix_hits = metrics.prefix_hits.labels(*labels)
        self._prefix_misses = metrics.prefix_misses.labels(*labels)
        self._prefix_reused = metrics.prefix_reused.labels(*labels)
        self._prefix_entries = metrics.prefix_entries.labels(*labels)
        self._prefix_bytes = metrics.prefix_bytes.labels(*labels)

    def forget(self) -> None:
        """Take this version's series out of the registry: it has unloaded."""
        metrics = self._metrics
        metrics.model_info.remove(*self._labels, *self._info)
        for family in (metrics.model_default, metrics.first_prediction, metrics.batch_size, metrics.queue_wait,
                       metrics.run_seconds, metrics.failed_batches, metrics.created, metrics.restored,
                       metrics.session_tokens, metrics.session_age, metrics.capacity_refusals, metrics.active,
                       metrics.state_bytes, metrics.prefix_hits, metrics.prefix_misses, metrics.prefix_reused,
                       metrics.prefix_entries, metrics.prefix_bytes):
            family.remove(*self._labels)
        for kind in ("step", "prefill"):
            metrics.tokens.remove(*self._labels, kind)
        for reason in Removal:
            metrics.ended.remove(*self._labels, reason.value)

    def record_default(self, is_default: bool) -> None:
        self._default.set(1 if is_default else 0)

    def watch_sessions(self, count: Callable[[], int], row_bytes: int) -> None:
        """Read the number of sessions held when Prometheus scrapes, not each time it changes."""
        self._active.set_function(count)
        self._state_bytes.set_function(lambda: count() * row_bytes)

    def watch_prefix_cache(self, entries: Callable[[], int], size_bytes: Callable[[], int]) -> None:
        self._prefix_entries.set_function(entries)
        self._prefix_bytes.set_function(size_bytes)

    def record_prefix_lookup(self, reused_tokens: int) -> None:
        """A new session's prompt looked up in the prefix-state cache; 0 reused tokens is a miss."""
        if reused_tokens:
            self._prefix_hits.inc()
            self._prefix_reused.inc(reused_tokens)
        else:
            self._prefix_misses.inc()

    def record_batch(self, report: BatchReport) -> None:
        """One model call: the batcher's `on_batch`."""
        self._batch_size.observe(report.steps)
        self._queue_wait.observe(report.queue_wait_seconds)
        if report.failed:
            self._failed_batches.inc()
            return
        self._run_seconds.observe(report.run_seconds)
        length = report.tokens // report.steps
        (self._step_tokens if length == 1 else self._prefill_tokens).inc(report.applied * length)

    def record_first_prediction(self, seconds: float) -> None:
        self._first_prediction.observe(seconds)

    def record_session_created(self) -> None:
        self._created.inc()

    def record_session_restored(self) -> None:
        self._restored.inc()

    def record_session_ended(self, reason: str, tokens: int, age_seconds: float) -> None:
        self._ended[reason].inc()
        self._session_tokens.observe(tokens)
        self._session_age.observe(age_seconds)

    def record_capacity_refusal(self) -> None:
        self._capacity_refusals.inc()


class HttpMetrics:
    """Requests to the HTTP face, in the same registry: `method` is the RPC a route runs (CreateSession,
    ..., or the page's own name such as Completions), `code` the HTTP status code answered."""

    def __init__(self, registry: CollectorRegistry):
        self._requests = Counter(f"{PREFIX}_http_requests", "Finished HTTP requests by method and HTTP status code.",
                                 ("method", "code"), registry=registry)
        self._seconds = Histogram(f"{PREFIX}_http_request_duration_seconds",
                                  "HTTP request latency from arrival to the end of the response; for server-sent "
                                  "events the stream's whole life.", ("method",), buckets=SECONDS_BUCKETS,
                                  registry=registry)

    def record(self, method: str, code: int, seconds: float) -> None:
        self._requests.labels(method, str(code)).inc()
        self._seconds.labels(method).observe(seconds)


def build_labels() -> dict[str, str]:
    """Versions of rnnserve and of what it serves with, for `rnnserve_build_info`."""
    labels = {"version": metadata.version("rnnserve"), "python": platform.python_version()}
    for package in ("onnxruntime", "grpcio", "numpy"):
        labels[package] = metadata.version(package)
    return labels


class MetricsEndpoint:
    """`registry` served at http://<listen>/metrics from a daemon thread; port 0 picks a free port."""

    def __init__(self, registry: CollectorRegistry, listen: str):
        # Each counter's and histogram's `_created` sample would repeat the process's start time
        # (the registry lives as long as the process) and double the series to store; the switch
        # is prometheus-client's, process-wide.
        disable_created_metrics()
        host, _, port = listen.rpartition(":")
        self._http, _thread = start_http_server(int(port), host.strip("[]"), registry)
        self.port: int = self._http.server_port

    def close(self) -> None:
        """Stop serving; blocks for up to half a second while the serving thread notices."""
        self._http.shutdown()
        self._http.server_close()
