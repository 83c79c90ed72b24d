"""Who is calling: bearer tokens checked in constant time, or the TLS client certificate.

Sessions belong to the identity that created it (`caller`), so the identity must never be the
secret itself: a token file line is `TOKEN [NAME]`, and the identity is NAME, or a short hash of
the token when the line has none. Tokens are compared as SHA-256 digests with
`hmac.compare_digest` against every configured token, all of them, so that neither where a
match is in the file nor how long the presented token is shows in the time taken.

The check runs once per call in `TokenAuthentication`, a server interceptor, for every service
except the ones left open (health, for probes; reflection, which describes only the public
schema), so that no method of ours can be left unchecked by forgetting it. A service may have
tokens of its own (Admin: operators, not callers of the model), which alone open it: `ServiceTokens`
is that rule, read by the interceptor here and by the HTTP face alike. The interceptor runs
in the call's own task, before the handler, so it hands the identity on in a context variable.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from pathlib import Path

import grpc

from rnnserve.server.faces.wire import method_handler

MIN_TOKEN_CHARS = 16  # a shorter token is guessable, which is no authentication
UNAUTHENTICATED_MESSAGE = "missing or unknown bearer token: send metadata 'authorization: Bearer <token>'"

_token_identity: contextvars.ContextVar[str] = contextvars.ContextVar("rnnserve_token_identity")


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message names the file and the line."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The configured bearer tokens (as digests) and the identity each one stands for."""

    def __init__(self, identities: Sequence[tuple[str, str]]):
        """`identities`: (token, identity) pairs; several tokens may share one identity (rotation)."""
        self._digests = [(_digest(token), identity) for token, identity in identities]

    @classmethod
    def from_file(cls, path: Path) -> Tokens:
        """Read `TOKEN [NAME]` lines; blank lines and lines starting with '#' are skipped."""
        pairs: list[tuple[str, str]] = []
        seen: set[str] = set()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            where = f"{path}, line {number}"
            if len(words) > 2:
                raise TokensFileError(f"{where}: expected 'TOKEN [NAME]', got {len(words)} words")
            token = words[0]
            if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable():
                raise TokensFileError(f"{where}: a token needs at least {MIN_TOKEN_CHARS} printable ASCII characters")
            if token in seen:
                raise TokensFileError(f"{where}: the same token appears twice")
            seen.add(token)
            pairs.append((token, words[1] if len(words) == 2 else f"token-{_digest(token).hex()[:12]}"))
        if not pairs:
            raise TokensFileError(f"{path}: no tokens (one 'TOKEN [NAME]' per line)")
        return cls(pairs)

    def identify(self, token: str | None) -> str | None:
        """The identity of `token`, None for an unknown or missing one; the time taken reveals neither."""
        presented = _digest(token or "")
        identity = None
        for digest, name in self._digests:  # every token, never stopping at a match
            if hmac.compare_digest(presented, digest):
                identity = name
        return identity


class ServiceTokens:
    """Which tokens open which service, for both faces: a service with tokens of its own (Admin) takes those
    and no others; every other service takes the callers' tokens, or is not checked when there are none."""

    def __init__(self, tokens: Tokens | None, own_tokens: Mapping[str, Tokens] | None = None):
        self._tokens = tokens
        self._own_tokens = dict(own_tokens or {})

    @classmethod
    def from_files(cls, tokens_file: Path | None, admin_service: str = "",
                   admin_tokens_file: Path | None = None) -> ServiceTokens:
        """The callers' tokens of `tokens_file`, and `admin_service`'s of `admin_tokens_file`: with tokens on and
        no such file, none at all (an operator's service is never open to every caller); with neither file,
        nothing is checked."""
        tokens = None if tokens_file is None else Tokens.from_file(tokens_file)
        if tokens_file is None and admin_tokens_file is None:
            return cls(None)
        admin_tokens = Tokens([]) if admin_tokens_file is None else Tokens.from_file(admin_tokens_file)
        return cls(tokens, {admin_service: admin_tokens})

    @property
    def checked(self) -> bool:
        """Whether any service is checked at all."""
        return self._tokens is not None or bool(self._own_tokens)

    def of(self, service: str) -> Tokens | None:
        """The tokens that open `service` (its full name); None when it is not checked."""
        return self._own_tokens.get(service, self._tokens)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    """The token of the call's `authorization: Bearer <token>` metadata, None without one."""
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


async def _refuse(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


# A refusal of the same kind as the method it replaces, so that grpc reads no request of a stream first.
_REFUSALS = {(requests, responses): method_handler(_refuse, requests, responses)
             for requests in (False, True) for responses in (False, True)}


UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]


class TokenAuthentication(grpc.aio.ServerInterceptor):
    """Refuse calls without a bearer token that opens their service UNAUTHENTICATED, except to the open services.

    `tokens` says which tokens open which service. A refused call never reaches the servicer, whose
    guard reports every call it ends; so the refusal is reported here, to `on_refused` (method
    name, status code), for the same metric.
    """

    def __init__(self, tokens: ServiceTokens, open_services: Collection[str],
                 on_refused: Callable[[str, int], None] | None = None):
        self._tokens = tokens
        self._open = frozenset(open_services)
        self._on_refused = on_refused

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service = details.method.rpartition("/")[0].lstrip("/")
        tokens = self._tokens.of(service)
        if handler is None or service in self._open or tokens is None:
            return handler
        identity = tokens.identify(bearer_token(details.invocation_metadata or ()))
        if identity is None:
            if self._on_refused is not None:
                self._on_refused(details.method.rpartition("/")[2], UNAUTHENTICATED)
            return _REFUSALS[handler.request_streaming, handler.response_streaming]
        _token_identity.set(identity)
        return handler


def interceptors(tokens_file: Path | None, open_services: Collection[str],
                 on_refused: Callable[[str, int], None] | None = None, admin_service: str = "",
                 admin_tokens_file: Path | None = None) -> list[grpc.aio.ServerInterceptor]:
    """The server's interceptors: token authentication when a tokens file is configured.

    `admin_service` takes the tokens of `admin_tokens_file` only (`ServiceTokens.from_files`).
    """
    tokens = ServiceTokens.from_files(tokens_file, admin_service, admin_tokens_file)
    return [TokenAuthentication(tokens, open_services, on_refused)] if tokens.checked else []


def caller(context: grpc.aio.ServicerContext) -> str:
    """Who owns the sessions this call creates: the token's identity when tokens are checked,
    else the TLS client certificate's (grpc's peer identity: its SANs, or its CN without any),
    else "" for anonymous callers."""
    identity = _token_identity.get(None)
    if identity is not None:
        return identity
    identities = context.peer_identities()
    return b",".join(identities).decode() if identities else ""
