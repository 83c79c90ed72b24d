"""The gRPC server: the Inference servicer with the stock health and reflection services.

`create_server` returns the server and the port it bound (pass port 0 for an ephemeral one);
`Server.stop` drains in order: health goes NOT_SERVING, new work is refused UNAVAILABLE, with a
session store every session is handed to it (after the work already queued on it), calls in
flight get the grace period, then the engine's background tasks stop. Unless metrics are
off, the server's metrics live in a registry of its own, served on their own port.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from rnnserve.bundle import Bundle, default_bundle_path, load_bundle
from rnnserve.server import logs
from rnnserve.server.core.engine import Engine
from rnnserve.server.faces import auth, tls, wire
from rnnserve.server.faces.convert import RequestReader, ResponseWriter
from rnnserve.server.faces.guard import Guarded
from rnnserve.server.faces.servicer import InferenceServicer
from rnnserve.server.faces.web.app import create_face
from rnnserve.server.faces.web.face import WebFace
from rnnserve.server.metrics import Metrics, MetricsEndpoint
from rnnserve.server.settings import Settings

SERVICE_NAME = wire.SERVICE.full_name
# Health of the session store (--redis-url), apart from the service's: a replica whose Redis is down
# still serves the sessions it holds, so a proxy keeps routing to it while this reports the fault.
STORE_HEALTH_NAME = "rnnserve.session_store"


class Server:
    def __init__(self, grpc_server: grpc.aio.Server, engine: Engine, health_servicer: health.aio.HealthServicer,
                 metrics_endpoint: MetricsEndpoint | None = None, web: WebFace | None = None):
        self.grpc_server = grpc_server
        self.web = web  # the HTTP face, None without --http-listen
        self.engine = engine
        self.health = health_servicer
        self.metrics_endpoint = metrics_endpoint

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on; None with metrics off."""
        return None if self.metrics_endpoint is None else self.metrics_endpoint.port

    @property
    def http_port(self) -> int | None:
        """The port the HTTP face is served on; None without one."""
        return None if self.web is None else self.web.port

    async def start(self) -> None:
        await self.engine.start()
        await self.grpc_server.start()
        if self.web is not None:
            await self.web.start()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self.engine.hibernation is not None:
            self.engine.hibernation.on_health = self._report_store_health
            await self.health.set(STORE_HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)

    def _report_store_health(self, healthy: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.ensure_future(self.health.set(STORE_HEALTH_NAME, status))

    async def stop(self, grace: float | None) -> None:
        self.engine.drain()
        await self.health.enter_graceful_shutdown()
        await self.engine.hand_off()
        await asyncio.gather(self.grpc_server.stop(grace), *([] if self.web is None else [self.web.stop(grace)]))
        await self.engine.stop()
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.close)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def create_server(settings: Settings, bundle: Bundle | None = None) -> tuple[Server, int]:
    """Build the server for `settings` (loading its bundle unless one is given) and bind its port.

    Call it inside the event loop that will run the server.
    """
    bundle = bundle or load_bundle(settings.bundle or default_bundle_path())
    logs.lower_caller_gone_records()
    metrics = Metrics(CollectorRegistry(), bundle, max_batch_size=settings.max_batch_size,
                      methods=[method.name for method in wire.SERVICE.methods]) if settings.metrics_listen else None
    engine = Engine(bundle, settings, metrics)
    # Health and reflection stay open to callers without a token: probes have none, and reflection
    # describes only the schema, which ships with the client anyway.
    open_services = (health.SERVICE_NAME, reflection.SERVICE_NAME)
    # Without SO_REUSEPORT a second server on a busy port fails to start instead of silently sharing it.
    on_refused = None if metrics is None else metrics.record_refused_rpc
    grpc_server = grpc.aio.server(interceptors=auth.interceptors(settings.auth_tokens_file, open_services, on_refused),
                                  options=[("grpc.so_reuseport", 0),
                                           ("grpc.max_receive_message_length", settings.max_message_bytes)])
    servicer = InferenceServicer(engine, RequestReader(bundle, settings), ResponseWriter(bundle),
                                 on_in_band_error=None if metrics is None else metrics.record_in_band_error)
    wire.add_to_server(Guarded(wire.Parsed(servicer), on_rpc=None if metrics is None else metrics.record_rpc),
                       grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], grpc_server)
    port = tls.add_port(grpc_server, settings)
    endpoint = None if metrics is None else MetricsEndpoint(metrics.registry, settings.metrics_listen)
    web = None if not settings.http_listen else create_face(
        settings, {SERVICE_NAME: servicer, health.SERVICE_NAME: health_servicer},
        None if metrics is None else metrics.registry)
    return Server(grpc_server, engine, health_servicer, endpoint, web), port
