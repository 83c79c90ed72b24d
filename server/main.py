"""`rnnserve-server`: load a bundle and serve it until SIGTERM or SIGINT, then drain and stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from rnnserve.bundle import BundleError
from rnnserve.server.app import create_server
from rnnserve.server.auth import TokensFileError
from rnnserve.server.settings import Settings, parse_settings

log = logging.getLogger("rnnserve.server")


async def serve(settings: Settings) -> None:
    server, port = create_server(settings)
    await server.start()
    bundle = server.engine.bundle
    log.info("serving model %s (%s, %d x %d, sha256 %s) on %s, port %d", bundle.name, bundle.cell,
             bundle.states[0].layers, bundle.states[0].hidden, bundle.sha256[:12], settings.listen, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down: refusing new work, %g s for calls in flight", settings.grace_seconds)
    await server.stop(settings.grace_seconds)
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(settings))
    except (BundleError, OSError, TokensFileError) as err:
        log.error("cannot serve: %s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
