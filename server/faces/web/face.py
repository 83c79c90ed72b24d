"""The HTTP face served by uvicorn inside the gRPC server's own event loop (uvloop or asyncio's).

The socket is bound when the face is made, as grpc binds its port in `create_server`, so that a
busy port stops the start and port 0 tells its number at once. uvicorn's `serve` is not used: it
takes over SIGINT and SIGTERM, which belong to `rnnserve-server`'s drain; the face runs uvicorn's
startup, its once-a-tick loop (the Date header) and its shutdown itself. TLS is the gRPC port's
(the same certificate, key and client CA); with a client CA, each connection's certificate
identity is put where the app reads the caller from (`PEER_IDENTITIES`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from rnnserve.server.settings import Settings

PEER_IDENTITIES = "rnnserve.peer_identities"  # in each request's scope["state"]: the client certificate's


def certificate_identities(certificate: dict) -> list[bytes]:
    """A client certificate's identity as grpc's peer_identities gives it: its SANs, else its CN."""
    names = [value for _kind, value in certificate.get("subjectAltName", ())]
    if not names:
        names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    return [name.encode() for name in names]


class _CertifiedH11(H11Protocol):
    """uvicorn's h11 connection, telling each request of the connection its client certificate's identity."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        if certificate:
            self.app_state = {**self.app_state, PEER_IDENTITIES: certificate_identities(certificate)}


def bind(listen: str) -> socket.socket:
    """A listening TCP socket on `listen` (host:port, [v6]:port); an OSError naming it when it cannot."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        return socket.create_server((host, int(port)), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot listen for HTTP on {listen}: {err}") from None


class WebFace:
    """`app` served on `listen` (default `settings.http_listen`), with the gRPC port's TLS."""

    def __init__(self, app: ASGIApp, settings: Settings, listen: str = ""):
        self._socket = bind(listen or settings.http_listen)
        self.port: int = self._socket.getsockname()[1]
        tls = {}
        if settings.tls_cert is not None:
            tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
        if settings.tls_client_ca is not None:
            tls |= {"ssl_ca_certs": settings.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, server_header=False,
                                http=_CertifiedH11 if settings.tls_client_ca is not None else "auto", **tls)
        config.load()  # reads the TLS files now: a bad one stops the start, as the gRPC port's does
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)
        self._ticks: asyncio.Task | None = None

    async def start(self) -> None:
        await self._server.startup(sockets=[self._socket])
        self._ticks = asyncio.create_task(self._server.main_loop())

    async def stop(self, grace: float | None) -> None:
        """Stop accepting, give requests in flight (server-sent events too) `grace` seconds, then cancel them."""
        if self._ticks is None:
            self._socket.close()
            return
        self._server.should_exit = True
        await self._ticks
        self._server.config.timeout_graceful_shutdown = grace
        await self._server.shutdown(sockets=[self._socket])
