"""The server's port: plaintext, TLS with a certificate, or mutual TLS with a client CA.

The files are checked with the standard `ssl` module before grpc sees them, because grpc takes
any bytes and fails only at each handshake: a key that does not match its certificate, or a CA
file that is not PEM, must stop the server at start with the file named, not refuse every
client later. (`ssl.SSLError` is an `OSError`, which `main` reports as "cannot serve".)
"""

from __future__ import annotations

import ssl

import grpc

from rnnserve.server.settings import Settings


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for `settings`, None when TLS is off; with a client CA, client certificates are required."""
    if settings.tls_cert is None:
        return None
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    check.load_cert_chain(settings.tls_cert, settings.tls_key)
    client_ca = None
    if settings.tls_client_ca is not None:
        check.load_verify_locations(settings.tls_client_ca)
        client_ca = settings.tls_client_ca.read_bytes()
    key_and_chain = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    return grpc.ssl_server_credentials([key_and_chain], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def add_port(server: grpc.aio.Server, settings: Settings, listen: str = "") -> int:
    """Listen on `listen` (default `settings.listen`), with TLS when configured; the port bound (an OSError when it
    cannot)."""
    listen = listen or settings.listen
    credentials = server_credentials(settings)
    try:
        if credentials is None:
            return server.add_insecure_port(listen)
        return server.add_secure_port(listen, credentials)
    except RuntimeError as err:
        raise OSError(f"cannot listen on {listen}: {err}") from None
