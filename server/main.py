"""`rnnserve-server`: load a bundle and serve it until SIGTERM or SIGINT, then drain and stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Sequence

from rnnserve.bundle import BundleError
from rnnserve.server import event_loop
from rnnserve.server.app import create_server
from rnnserve.server.core.models import ModelRegistry
from rnnserve.server.core.served_model import ServedModel
from rnnserve.server.faces.auth import TokensFileError
from rnnserve.server.logs import configure_logging
from rnnserve.server.settings import Settings, parse_settings

log = logging.getLogger("rnnserve.server")


async def serve(settings: Settings) -> None:
    server, port = create_server(settings)
    await server.start()
    settle_garbage_collector()
    loop = asyncio.get_running_loop()
    loop_module = type(loop).__module__.split(".")[0]  # "uvloop" or "asyncio"
    models = server.engine.models
    log.info("serving on %s, port %d, event loop %s, GIL switch interval %d us: %s", settings.listen, port,
             loop_module, round(sys.getswitchinterval() * 1e6), "; ".join(describe(model, models) for model in models.all()))
    if server.http_port is not None:
        log.info("HTTP/JSON and the playground on %s, port %d", settings.http_listen, server.http_port)
    if server.v2_port is not None:
        log.info("Open Inference Protocol (KServe v2) over gRPC on %s, port %d", settings.v2_listen, server.v2_port)
    if server.v2_http_port is not None:
        log.info("Open Inference Protocol (KServe v2) REST routes on %s, port %d", settings.v2_http_listen,
                 server.v2_http_port)
    if server.metrics_port is not None:
        log.info("metrics at /metrics on %s, port %d", settings.metrics_listen, server.metrics_port)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down: refusing new work, %g s for calls in flight", settings.grace_seconds)
    await server.stop(settings.grace_seconds)
    log.info("stopped")


# Container objects allocated, net, before a young collection (Python's default: 700). A unary call's objects live
# as long as the call, 80-90 ms at 256 callers, so with the default each of them was scanned by several young
# collections and promoted to be scanned again: 3.9% of the server's CPU went to the collector at 256 unary callers
# (976 young collections in 10 s); frozen start-up and 20,000 took it to 0.4% (3 in 10 s, 7 ms each). 10,000 halves
# that pause, which a lone session's step may meet.
YOUNG_COLLECTION_THRESHOLD = 10_000


def settle_garbage_collector() -> None:
    """Leave what start-up built (modules, models, settings) out of every later collection, and collect the young
    generation less often: reference counting frees nearly everything a call allocates, and what the collector
    scans is mostly calls still in flight, not garbage."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


def describe(model: ServedModel, models: ModelRegistry) -> str:
    """A model version for the serving line: what it is, and which requests get it."""
    bundle = model.bundle
    roles = [role for role, applies in (("the default", models.is_server_default(model)),
                                        ("its model's default", models.is_default(model)
                                         and not models.is_server_default(model))) if applies]
    return (f"{model.describe()} ({bundle.cell}, state {bundle.describe_states()}, sha256 "
            f"{bundle.sha256[:12]}{', ' + roles[0] if roles else ''})")


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)  # process-wide, hence here and not in the server
    try:
        event_loop.run(serve(settings), settings.event_loop)
    except (BundleError, OSError, TokensFileError) as err:
        log.error("cannot serve: %s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
