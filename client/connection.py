"""Where and how to reach the server: address, TLS, bearer tokens, deadline and retry policy.

`Client` and `AsyncClient` differ only in the kind of channel they open; everything they are
configured with lives here, so both read the same options the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from rnnserve.client.retry import RetryPolicy
from rnnserve.v1 import rnnserve_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
# Metadata naming the session a call is about, for a proxy in front of replicas to route by
# (deploy/haproxy): every step of a session then reaches the replica that holds it.
SESSION_HEADER = "x-session-id"
# Initial metadata of a Stream from a server whose sessions move between replicas routed by SESSION_HEADER:
# the client then carries each session's steps on a stream of its own that names it (see shared_streams).
ROUTING_HEADER, ROUTING_BY_SESSION = "x-rnnserve-routing", "by-session"
# The services a call may go to: callers' Inference, and operators' Admin, which takes tokens of its own.
INFERENCE, ADMIN = "Inference", "Admin"


@dataclass(frozen=True)
class TLS:
    """PEM bytes for a TLS channel: `ca` overrides the system roots, `cert` and `key` enable mutual TLS."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_files(cls, ca: str | Path | None = None, cert: str | Path | None = None,
                   key: str | Path | None = None) -> TLS:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return cls(read(ca), read(cert), read(key))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


@dataclass(frozen=True)
class Connection:
    """Everything a client is configured with; a client owns one and never changes it."""

    address: str = DEFAULT_ADDRESS
    timeout: float | None = DEFAULT_TIMEOUT  # default deadline of every call, in seconds
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls: TLS | None = None
    token: str | None = None  # sent as "authorization: Bearer <token>" on every Inference call
    # Sent instead of `token` on Admin calls, which take only the server's admin tokens; None sends `token`
    # (a server without tokens needs neither, and a token may be in both of a server's files).
    admin_token: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of an Inference call."""
        return self.metadata_for(INFERENCE)

    def metadata_for(self, service: str) -> tuple[tuple[str, str], ...]:
        # Plain metadata rather than call credentials, which grpc refuses to send over a
        # plaintext channel: the token must also reach a local server without TLS.
        token = (self.admin_token or self.token) if service == ADMIN else self.token
        return (("authorization", f"Bearer {token}"),) if token else ()

    @property
    def _channel_options(self) -> list[tuple[str, int]]:
        # Reconnect on the retry schedule: by default grpc waits a second before reconnecting to
        # a server that refused, and a retry sent during that wait fails without trying.
        return [("grpc.initial_reconnect_backoff_ms", int(self.retry.initial_backoff * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(self.retry.max_backoff * 1000))]

    def channel(self, *, aio: bool) -> grpc.Channel | grpc.aio.Channel:
        module = grpc.aio if aio else grpc
        if self.tls is None:
            return module.insecure_channel(self.address, self._channel_options)
        return module.secure_channel(self.address, self.tls.credentials(), self._channel_options)

    def call_options(self, timeout: float | None, request: object = None, service: str = INFERENCE) -> dict:
        """Keyword arguments for a stub call to `service`: its deadline (per-call override or default), the
        service's token, and the session the request names (if any) as `x-session-id`."""
        metadata = self.metadata_for(service)
        session_id = getattr(request, "session_id", "")
        if session_id:
            metadata = (*metadata, (SESSION_HEADER, session_id))
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": metadata}


class ClientBase:
    """What `Client` and `AsyncClient` share: their options, channel and stubs.

    They differ only in how a call is awaited, so each defines its own call methods on top.
    """

    _aio = False
    _step_streams: type  # StepStreams or AsyncStepStreams: how this kind of client carries `session.step()`

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = DEFAULT_TIMEOUT,
                 retries: int = RetryPolicy.retries, tls: TLS | bool = False, token: str | None = None,
                 admin_token: str | None = None, unary: bool = False):
        """Connect lazily to `address` (host:port); nothing is sent until the first call.

        `timeout` is the default deadline of each call in seconds (every method takes its own
        `timeout=` too); `retries` bounds how often a call that is safe to repeat is retried on
        UNAVAILABLE; `tls=True` uses the system's root certificates, a `TLS` value custom or
        mutual TLS; `token` is sent as a bearer token on every call, except that `admin_token`,
        when given, is sent instead on the calls of `client.admin`. `session.step()` goes over Stream
        calls the client shares among its sessions, a stream's price for a unary call's behaviour (see
        `shared_streams`); `unary=True` sends each step as a Step call of its own instead.
        """
        self._connection = Connection(address, timeout, RetryPolicy(retries=retries),
                                      TLS() if tls is True else tls or None, token, admin_token)
        self._channel = self._connection.channel(aio=self._aio)
        self._inference = rnnserve_pb2_grpc.InferenceStub(self._channel)
        self._stubs = {INFERENCE: self._inference, ADMIN: rnnserve_pb2_grpc.AdminStub(self._channel)}
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._steps = None if unary else self._step_streams(self._connection, self._inference)
