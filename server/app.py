"""The gRPC server: the Inference and Admin servicers with the stock health and reflection services.

`create_server` returns the server and the port it bound (pass port 0 for an ephemeral one);
`Server.stop` drains in order: health goes NOT_SERVING, new work is refused UNAVAILABLE, with a
session store every session is handed to it (after the work already queued on it), calls in
flight get the grace period, then the engine's background tasks stop. Unless metrics are
off, the server's metrics live in a registry of its own, served on their own port. Unless it serves
one bundle alone, the server polls its model repository (the shipped one by default) for versions
dropped in while it serves (`model_loading`).
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from rnnserve.bundle import Bundle
from rnnserve.server import logs
from rnnserve.server.core.engine import Engine
from rnnserve.server.core.model_loading import ModelLoader, served_repository, startup_bundles
from rnnserve.server.faces import auth, tls, wire
from rnnserve.server.faces.admin import AdminServicer
from rnnserve.server.faces.convert import Readers, ResponseWriter
from rnnserve.server.faces.guard import Guarded
from rnnserve.server.faces.kserve import rest as v2_rest
from rnnserve.server.faces.kserve import service as v2_service
from rnnserve.server.faces.kserve.infer import Inference
from rnnserve.server.faces.kserve.service import V2Servicer
from rnnserve.server.faces.servicer import InferenceServicer
from rnnserve.server.faces.web.app import create_face
from rnnserve.server.faces.web.face import WebFace
from rnnserve.server.metrics import HttpMetrics, Metrics, MetricsEndpoint
from rnnserve.server.settings import Settings

SERVICE_NAME = wire.SERVICE.full_name
ADMIN_SERVICE_NAME = wire.ADMIN_SERVICE.full_name
# Health of the session store (--redis-url), apart from the service's: a replica whose Redis is down
# still serves the sessions it holds, so a proxy keeps routing to it while this reports the fault.
STORE_HEALTH_NAME = "rnnserve.session_store"


class Server:
    def __init__(self, grpc_server: grpc.aio.Server, engine: Engine, loader: ModelLoader,
                 health_servicer: health.aio.HealthServicer, metrics_endpoint: MetricsEndpoint | None = None,
                 web: WebFace | None = None):
        self.grpc_server = grpc_server
        self.web = web  # the HTTP face, None without --http-listen
        self.v2_web: WebFace | None = None  # the v2 protocol's REST routes, None without --v2-http-listen
        self.v2_port: int | None = None  # the v2 protocol's gRPC port, None without --v2-listen
        self.engine = engine
        self.loader = loader
        self._watching: asyncio.Task | None = None
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

    @property
    def v2_http_port(self) -> int | None:
        """The port the v2 protocol's REST routes are served on; None without them."""
        return None if self.v2_web is None else self.v2_web.port

    @property
    def _web_faces(self) -> list[WebFace]:
        return [face for face in (self.web, self.v2_web) if face is not None]

    async def start(self) -> None:
        await self.engine.start()
        if self.loader.repository is not None and self.loader.poll_seconds:
            self._watching = asyncio.create_task(self.loader.watch(), name="rnnserve-model-repository")
        await self.grpc_server.start()
        for face in self._web_faces:
            await face.start()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self.engine.hibernation is not None:
            self.engine.hibernation.on_health = self._report_store_health
            await self.health.set(STORE_HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)

    def _report_store_health(self, healthy: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.ensure_future(self.health.set(STORE_HEALTH_NAME, status))

    async def stop(self, grace: float | None) -> None:
        if self._watching is not None:
            self._watching.cancel()
        self.engine.drain()
        await self.health.enter_graceful_shutdown()
        await self.engine.hand_off(grace or 0.0)
        await asyncio.gather(self.grpc_server.stop(grace), *(face.stop(grace) for face in self._web_faces))
        await self.engine.stop()
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.close)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def create_server(settings: Settings, bundle: Bundle | None = None) -> tuple[Server, int]:
    """Build the server for `settings` (loading its models, unless `bundle` is given to serve alone) and bind
    its port.

    Call it inside the event loop that will run the server.
    """
    repository = None if bundle is not None else served_repository(settings.model_repository, settings.bundle)
    bundles = [(bundle, True)] if bundle is not None else startup_bundles(repository, settings.bundle,
                                                                          settings.default_model)
    logs.lower_caller_gone_records()
    services = (wire.SERVICE, wire.ADMIN_SERVICE, *((v2_service.SERVICE,) if settings.v2_listen else ()))
    methods = list(dict.fromkeys(method.name for service in services for method in service.methods))
    metrics = Metrics(CollectorRegistry(), max_batch_size=settings.max_batch_size, max_sessions=settings.max_sessions,
                      methods=methods) if settings.metrics_listen else None
    engine = Engine(bundles, settings, metrics)
    if metrics is not None:
        for name, version in ((b.name, b.version) for b, _ in bundles):
            metrics.record_model_load(name, version, loaded=True)
    loader = ModelLoader(engine, repository, settings.model_poll_seconds)
    # Health and reflection stay open to callers without a token: probes have none, and reflection
    # describes only the schema, which ships with the client anyway.
    open_services = (health.SERVICE_NAME, reflection.SERVICE_NAME)
    # Without SO_REUSEPORT a second server on a busy port fails to start instead of silently sharing it.
    on_refused = None if metrics is None else metrics.record_refused_rpc
    grpc_server = grpc.aio.server(interceptors=auth.interceptors(settings.auth_tokens_file, open_services, on_refused,
                                                                 ADMIN_SERVICE_NAME, settings.admin_tokens_file),
                                  options=[("grpc.so_reuseport", 0),
                                           ("grpc.max_receive_message_length", settings.max_message_bytes)])
    on_rpc = None if metrics is None else metrics.record_rpc
    # One reading of every request, shared by rnnserve's faces, Admin and the v2 face.
    readers, writer = Readers(settings), ResponseWriter()
    servicer = InferenceServicer(engine, readers, writer,
                                 on_in_band_error=None if metrics is None else metrics.record_in_band_error,
                                 routed_by_session=bool(settings.redis_url))
    wire.add_to_server(Guarded(wire.Parsed(servicer), on_rpc=on_rpc), grpc_server)
    admin = AdminServicer(engine, loader, readers, writer)
    wire.add_to_server(Guarded(wire.Parsed(admin, wire.ADMIN_SERVICE), on_rpc=on_rpc), grpc_server, wire.ADMIN_SERVICE)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection([SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME,
                                         reflection.SERVICE_NAME], grpc_server)
    inference = Inference(engine, readers)
    if settings.v2_listen:
        v2 = V2Servicer(engine, inference, settings.default_ttl_seconds,
                        on_in_band_error=None if metrics is None else metrics.record_in_band_error)
        wire.add_to_server(Guarded(wire.Parsed(v2, v2_service.SERVICE), on_rpc=on_rpc), grpc_server,
                           v2_service.SERVICE)
    port = tls.add_port(grpc_server, settings)
    endpoint = None if metrics is None else MetricsEndpoint(metrics.registry, settings.metrics_listen)
    http_metrics = None if metrics is None or not (settings.http_listen or settings.v2_http_listen) else HttpMetrics(
        metrics.registry)
    web = None if not settings.http_listen else create_face(
        settings, {SERVICE_NAME: servicer, ADMIN_SERVICE_NAME: admin, health.SERVICE_NAME: health_servicer},
        http_metrics)
    server = Server(grpc_server, engine, loader, health_servicer, endpoint, web)
    if settings.v2_listen:
        server.v2_port = tls.add_port(grpc_server, settings, settings.v2_listen)
    if settings.v2_http_listen:
        tokens = auth.ServiceTokens.from_files(settings.auth_tokens_file, ADMIN_SERVICE_NAME,
                                               settings.admin_tokens_file)
        server.v2_web = WebFace(v2_rest.create_app(engine, inference, tokens, http_metrics, settings.max_message_bytes,
                                                   settings.default_ttl_seconds), settings, settings.v2_http_listen)
    return server, port
