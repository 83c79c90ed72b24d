"""Server configuration: one typed object, each field documented once for `--help` and readers.

Every field is a `--flag` with an `RNNSERVE_<FIELD>` environment twin (flag beats environment
beats default). The environment is read only by `parse_settings`, never at import, and no
other module reads it: they all receive a `Settings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rnnserve.server.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS
from rnnserve.server.core.prefix_cache import IDENTITY, SCOPES
from rnnserve.server.logs import LOG_FORMATS
from rnnserve.wire_numbers import MAX_UINT32_LIMIT

ENV_PREFIX = "RNNSERVE_"
FULL_POLICIES = ("refuse", "evict-oldest")


def _setting(default: object, help: str, **rules: object):
    """A field with its `--help` text and the rules `Settings` checks (minimum, maximum, choices); a limit of a
    uint32 request field has MAX_UINT32_LIMIT as its maximum (see rnnserve/wire_numbers.py)."""
    return field(default=default, metadata={"help": help, **rules})


@dataclass(frozen=True)
class Settings:
    bundle: Path | None = _setting(
        None, "One model bundle directory (manifest.json + model.onnx) to serve alone, instead of a repository: "
        "Admin then loads nothing and nothing is polled. Default: the repository shipped with rnnserve.")
    model_repository: Path | None = _setting(
        None, "Model repository to serve: <dir>/<model>/<version>/ holds a bundle, versions are positive integers "
        "(Triton's layout), and an optional <dir>/<model>/model.json {\"default_version\": \"N\"} picks the version "
        "new sessions get (else the highest). Every version is loaded and checked (bundle checks and a parity "
        "self-test); a version that fails is refused and logged. Not with --bundle. Default: the repository shipped "
        "with rnnserve (its models are served, loaded and polled the same way).")
    default_model: str = _setting(
        "", "The repository's model that requests get when they name none. Empty: the first by name.")
    model_poll_seconds: float = _setting(
        5.0, "How often to look in the model repository for versions dropped in (or removed). A new version newer "
        "than its model's default is loaded, checked and made the default for new sessions; the version it replaces "
        "serves its running sessions and unloads after the last one ends. Copy a version in under a name starting "
        "with '.' and rename it into place, so that it appears whole. 0: never look (Admin calls still load).",
        minimum=0)
    listen: str = _setting(
        "127.0.0.1:50051", "host:port to serve on. Loopback by default because callers are anonymous unless TLS "
        "and tokens are set; use 0.0.0.0:50051 to serve other machines, and port 0 to let the system pick one.")
    metrics_listen: str = _setting(
        "", "host:port to serve Prometheus metrics on, at /metrics, e.g. 127.0.0.1:9464 (the container image "
        "serves them on 0.0.0.0:9464); port 0 lets the system pick one. Empty: no metrics are kept at all.")
    http_listen: str = _setting(
        "", "host:port to serve the HTTP/JSON face on (the same operations as gRPC, server-sent events, an "
        "OpenAI-style /v1/completions, the playground page at /), e.g. 127.0.0.1:8080; port 0 lets the system "
        "pick one. It shares the engine, TLS, tokens and ownership with gRPC. Empty: no HTTP face.")
    v2_listen: str = _setting(
        "", "host:port to serve the Open Inference Protocol (KServe v2, Triton's inference.GRPCInferenceService) "
        "over gRPC on, e.g. 127.0.0.1:8001, for tritonclient and KServe callers: a Triton sequence (sequence_id, "
        "sequence_start, sequence_end) is a session of the caller's. It shares the engine, TLS, tokens and "
        "ownership with the other faces; port 0 lets the system pick one. Empty: no v2 gRPC face.")
    v2_http_listen: str = _setting(
        "", "host:port to serve the Open Inference Protocol's REST routes (/v2/health/..., /v2/models/...) on, e.g. "
        "127.0.0.1:8000, for tritonclient.http and KServe callers; port 0 lets the system pick one. Empty: none.")
    tls_cert: Path | None = _setting(
        None, "PEM certificate (chain) the server presents: serves TLS instead of plaintext. Needs --tls-key.")
    tls_key: Path | None = _setting(
        None, "PEM private key of --tls-cert.")
    tls_client_ca: Path | None = _setting(
        None, "PEM CA certificate(s) for mutual TLS: clients must present a certificate it signed, and sessions "
        "belong to that certificate's identity (its SANs, or its CN). Needs --tls-cert.")
    auth_tokens_file: Path | None = _setting(
        None, "File of bearer tokens, one 'TOKEN [NAME]' per line ('#' comments and blank lines skipped): every "
        "call but health checks and reflection then needs metadata 'authorization: Bearer TOKEN', and its "
        "sessions belong to NAME (or a hash of the token without one). Tokens have at least 16 characters.")
    admin_tokens_file: Path | None = _setting(
        None, "File of bearer tokens, as --auth-tokens-file, for the Admin service alone (loading, unloading and "
        "choosing model versions). With --auth-tokens-file and without this, nobody may call Admin; without "
        "either, Admin is open like everything else, to callers who can reach the port (loopback by default).")
    max_message_bytes: int = _setting(
        4 * 1024 * 1024, "Largest request message read; gRPC refuses a larger one RESOURCE_EXHAUSTED unread.",
        minimum=1)
    max_sessions: int = _setting(
        100_000, "Most sessions held at once: memory is bounded by this times the model's state bytes per session.",
        minimum=1)
    when_full: str = _setting(
        "refuse", "What creating a session does when the table is full: 'refuse' answers RESOURCE_EXHAUSTED, "
        "'evict-oldest' removes the least recently active idle session.", choices=FULL_POLICIES)
    max_sessions_per_identity: int = _setting(
        0, "Most sessions one identity may hold at once (a token's name, a client certificate's identity; anonymous "
        "callers are one identity). One more is refused RESOURCE_EXHAUSTED, whatever --when-full says: an identity "
        "at its cap evicts nobody, not even its own sessions. With N identities, N times this at most "
        "--max-sessions keeps the table from filling, so that no identity's sessions are evicted for another's. "
        "0: no cap.", minimum=0)
    default_ttl_seconds: int = _setting(
        3600, "Idle time-to-live of a session that asks for none; an idle session is freed after it.", minimum=1,
        maximum=MAX_UINT32_LIMIT)
    max_ttl_seconds: int = _setting(
        86_400, "Longest idle time-to-live a session may ask for.", minimum=1, maximum=MAX_UINT32_LIMIT)
    max_input_tokens: int = _setting(
        16_384, "Most token ids in one step or prompt.", minimum=1)
    max_input_chars: int = _setting(
        16_384, "Most characters of text in one step or prompt.", minimum=1)
    max_generate_tokens: int = _setting(
        4096, "Most tokens one Generate call may ask for.", minimum=1, maximum=MAX_UINT32_LIMIT)
    max_batch_size: int = _setting(
        256, "Most sessions whose steps run in one model call.", minimum=1)
    max_batch_tokens: int = _setting(
        65_536, "Most tokens (sessions x prompt length) in one model call: bounds the memory of batched prefills.",
        minimum=1)
    max_queue_delay_us: int = _setting(
        0, "How long a step may wait for others to fill its batch. 0 runs whatever is waiting as soon as the model "
        "is free, which batches under load anyway, because steps gather while a call runs.", minimum=0)
    adaptive_wait_us: int = _setting(
        5000, "Adaptive batching (with --max-queue-delay-us 0): while fewer steps are queued than sessions answered "
        "moments ago have yet to come back, wait up to this long for them, as long as they keep arriving (see "
        "--adaptive-gap-us); a lone session never waits. Serves many unary Step callers with fewer, fuller model "
        "calls. 0: off.", minimum=0)
    adaptive_gap_us: int = _setting(
        500, "Adaptive batching stops waiting once no step has arrived for this long.", minimum=0)
    loop_max_tokens: int = _setting(
        1, "A model call of at most this many tokens (steps x step length) runs on the event loop's thread when "
        "nothing else is waiting and the previous call was lone too, skipping the hand-off to the model thread "
        "and back: a lone session's step is faster, and the loop never blocks for more than such a call. 0 runs "
        "every call on the model thread.",
        minimum=0)
    ort_threads: int = _setting(
        0, "onnxruntime intra-op threads; 0 gives it one per CPU this process may run on.", minimum=0)
    ort_spinning: str = _setting(
        "off", "Whether onnxruntime's threads spin a short while for the next call ('on', onnxruntime's own "
        "default) or sleep at once ('off'). 'on' cuts a lone session's step latency by about a fifth on a "
        "virtual machine, where waking a sleeping CPU is slow, but the spinning takes cores from the event "
        "loop: at 256 busy sessions it halved the throughput of unary Step calls.", choices=("on", "off"))
    event_loop: str = _setting(
        DEFAULT_EVENT_LOOP, "The asyncio event loop: 'uvloop' (installed with rnnserve where it builds) runs the "
        "loop's per-message callbacks in C, about a fifth less CPU per streamed step than 'asyncio', the "
        "standard library's.", choices=EVENT_LOOPS)
    gil_switch_interval_us: int = _setting(
        5000, "How long a Python thread may keep the GIL while another waits for it (sys.setswitchinterval; 5000 is "
        "Python's own). Shorter hands the GIL to the model thread sooner after each onnxruntime call: at 256 "
        "sessions, 100 moved about 7 percent more tokens/s over streams but about 19 percent fewer over unary "
        "Step calls (the model thread's CPU per token rose from 88 to 114 us). Lower it for servers whose "
        "clients stream.", minimum=1)
    grace_seconds: float = _setting(
        10.0, "On SIGTERM or SIGINT, how long calls in flight may take to finish before they are cancelled.",
        minimum=0)
    sweep_seconds: float = _setting(
        1.0, "How often expired sessions are freed (an expired session is refused at once regardless).",
        minimum=0.001)
    snapshot_path: str = _setting(
        "", "File that keeps every session across restarts: written atomically on SIGTERM or SIGINT (and "
        "periodically, see below), read at start. Each session is restored only by the model version it ran on; "
        "the sessions of versions not loaded stay in a copy, <file>.unrestored, and a snapshot of none of the "
        "models served is set aside as <file>.refused. Empty: sessions end with the process.")
    snapshot_interval_seconds: float = _setting(
        0.0, "Also write the snapshot this often, so that a crash (kill -9) loses at most this much work. "
        "0: only on SIGTERM or SIGINT.", minimum=0)
    redis_url: str = _setting(
        "", "Redis holding sessions at rest, for replicas behind a proxy that routes by session id "
        "(e.g. redis://redis:6379/0; needs the 'redis' extra): idle sessions hibernate there, a drained replica hands "
        "its sessions over, and any replica wakes a session it is asked for. Empty: sessions live in this process "
        "only.")
    replica_id: str = _setting(
        "", "This replica's name in the session store, telling whose a live session is. Empty: hostname:port.")
    hibernate_after_seconds: float = _setting(
        300.0, "With --redis-url: a session idle this long moves to Redis and frees its slot; its next call, on any "
        "replica, brings it back. 0: sessions hibernate only when the replica is drained.", minimum=0)
    write_through_every: int = _setting(
        0, "With --redis-url: also store a session every this many tokens, answering the step that crosses the mark "
        "only once Redis has it, so that a replica killed outright (kill -9) loses at most the tokens since. "
        "0: off.", minimum=0)
    redis_lease_seconds: float = _setting(
        10.0, "How long a replica's hold on its sessions outlives its last renewal (every third of this): how soon "
        "the sessions of a replica that died can be taken by another.", minimum=0.1)
    redis_timeout_seconds: float = _setting(
        1.0, "How long a Redis call may take before it counts as a fault (Redis down or slow).", minimum=0.001)
    rewind_depth: int = _setting(
        32, "How many of its last tokens a session can undo (RewindSession). Each session keeps its token log "
        "(4 bytes a token) and a checkpoint of its state (one row, 8.5 KiB for the shipped model) every "
        "--rewind-checkpoint-every tokens back to that depth: at most depth/every + 1 rows, none before it has read "
        "that many tokens. 0 turns rewinding off and keeps nothing.", minimum=0)
    rewind_checkpoint_every: int = _setting(
        32, "Tokens between a session's checkpoints: a rewind replays at most this plus the depth in one model call; "
        "fewer checkpoints cost less memory and a longer replay.", minimum=1)
    prefix_cache_scope: str = _setting(
        IDENTITY, "Whose cached prompts a new session may start from. 'identity': only its own identity's (and the "
        "named states shared with everyone), so that neither an answer's cached_prompt_tokens nor its speed tells "
        "one caller what another has sent. 'global': anyone's, for a deployment whose callers are one trusted "
        "tenant; any caller can then confirm any prompt another has sent (docs/SECURITY.md).", choices=SCOPES)
    prefix_cache_entries: int = _setting(
        1024, "Most prompts whose state the prefix-state cache keeps for one identity (its least recently used go "
        "first; no identity's prompts evict another's), so that a new session whose prompt starts with one skips "
        "reading that part. With --prefix-cache-scope global, the most for everyone together. 0 turns the cache "
        "off; named states are kept regardless.", minimum=0)
    prefix_cache_bytes: int = _setting(
        64 * 1024 * 1024, "Most bytes the prefix-state cache holds for one identity (a state row and the prompt's "
        "tokens per entry); with --prefix-cache-scope global, for everyone together.", minimum=0)
    prefix_cache_identities: int = _setting(
        16, "Most identities whose prompts the prefix-state cache keeps: the prompts of any further identity are "
        "not cached (they are read as usual). Its evictable entries hold at most this times --prefix-cache-bytes.",
        minimum=1)
    prefix_cache_idle_seconds: float = _setting(
        3600.0, "How long a cached prompt nobody starts from stays in the prefix-state cache; an identity whose "
        "prompts have all gone leaves room for another (--prefix-cache-identities). 0: until evicted.", minimum=0)
    max_states_per_identity: int = _setting(
        64, "Most named states one identity may register (RegisterState) on one model version: each is a state row "
        "and its prompt, pinned in memory until deleted. Beyond it, RESOURCE_EXHAUSTED (QuotaFailure subject "
        "'identity'); replacing one of its own names is always allowed. 0: no bound.", minimum=0)
    prefix_cache_min_tokens: int = _setting(
        16, "Shortest prompt whose state is cached: shorter ones are read in about as long as a copy takes.",
        minimum=1)
    remember_removed: int = _setting(
        65_536, "How many removed session ids are remembered, so that NOT_FOUND can say closed, expired or evicted.",
        minimum=1)
    log_level: str = _setting(
        "INFO", "Logging level: INFO logs lifecycle events, DEBUG also each session created and closed.",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _setting(
        "text", "Log lines as 'text' for people, or 'json' (one object per line) for log collectors.",
        choices=LOG_FORMATS)

    @property
    def ort_spins(self) -> bool:
        return self.ort_spinning == "on"

    def __post_init__(self) -> None:
        for settings_field in dataclasses.fields(self):
            value, rules = getattr(self, settings_field.name), settings_field.metadata
            if "minimum" in rules and value < rules["minimum"]:
                raise ValueError(f"{settings_field.name} must be at least {rules['minimum']}, got {value}")
            if "maximum" in rules and value > rules["maximum"]:
                raise ValueError(f"{settings_field.name} must be at most {rules['maximum']}, got {value}")
            if "choices" in rules and value not in rules["choices"]:
                raise ValueError(f"{settings_field.name} must be one of {', '.join(rules['choices'])}, got {value!r}")
        if self.snapshot_interval_seconds and not self.snapshot_path:
            raise ValueError("snapshot_interval_seconds needs a snapshot_path to write to")
        if self.write_through_every and not self.redis_url:
            raise ValueError("write_through_every needs a redis_url to write to")
        if self.default_ttl_seconds > self.max_ttl_seconds:
            raise ValueError(f"default_ttl_seconds ({self.default_ttl_seconds}) exceeds max_ttl_seconds "
                             f"({self.max_ttl_seconds})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.bundle is not None and self.model_repository is not None:
            raise ValueError("bundle and model_repository exclude each other: serve one bundle or a repository")
        if self.default_model and self.bundle is not None:
            raise ValueError("default_model chooses among a repository's models: not with a bundle served alone")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")


def _parser_type(settings_field: dataclasses.Field) -> type:
    """The field's type for argparse: the one non-None type of its annotation."""
    return {"Path | None": Path, "str": str, "int": int, "float": float}[settings_field.type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnserve-server",
        description="Serve a recurrent next-token model over gRPC (rnnserve.v1), keeping each session's "
                    "hidden state in memory.",
        epilog=f"Every flag can also be set by an environment variable: {ENV_PREFIX} and the flag's name in "
               f"capitals with underscores, e.g. {ENV_PREFIX}MAX_SESSIONS=1000. A flag beats its variable.")
    for settings_field in dataclasses.fields(Settings):
        flag = "--" + settings_field.name.replace("_", "-")
        default = settings_field.default
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(flag, dest=settings_field.name, type=_parser_type(settings_field), default=default,
                            help=settings_field.metadata["help"] + shown,
                            choices=settings_field.metadata.get("choices"))
    return parser


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from defaults, then `RNNSERVE_*` variables, then flags; exits with a usage message on a bad value."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    from_env = {}
    for settings_field in dataclasses.fields(Settings):
        variable = ENV_PREFIX + settings_field.name.upper()
        if variable in environ:
            try:
                from_env[settings_field.name] = _parser_type(settings_field)(environ[variable])
            except ValueError:
                parser.error(f"{variable}={environ[variable]!r} is not a valid {settings_field.name}")
    parser.set_defaults(**from_env)
    args = parser.parse_args(argv)
    try:
        return Settings(**vars(args))
    except ValueError as err:
        parser.error(str(err))
