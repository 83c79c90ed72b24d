"""The Starlette application: one endpoint per row of `routes.ROUTES`, all made by `rpc_endpoint`.

Each endpoint checks the caller as gRPC's interceptor does (the same `auth.ServiceTokens` rule, so
Admin's routes take only the admin tokens; from the `Authorization: Bearer` header; else the client
certificate), parses the JSON body (or the query string's fields) into the route's request
message, runs the servicer's own method, and answers its response as JSON, or
its error as `status.error_body` with the matching HTTP code. Every request is measured with
the RPC its route runs as `method` and the HTTP status as `code`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route as StarletteRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message as AsgiMessage, Receive, Scope, Send

from rnnserve.server.faces.auth import UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, ServiceTokens, bearer_token
from rnnserve.server.faces.web import completions, openapi, sse
from rnnserve.server.faces.web.calls import Aborted, HttpContext, deadline_of, json_body, parse, run, to_json
from rnnserve.server.faces.web.face import PEER_IDENTITIES, WebFace
from rnnserve.server.faces.web.routes import ADMIN, INFERENCE, ROUTES, Route
from rnnserve.server.faces.web.status import error_event, error_response
from rnnserve.server.metrics import HttpMetrics
from rnnserve.server.settings import Settings

STATIC = Path(__file__).parent / "static"
METHOD = "rnnserve.method"  # the scope key naming, for metrics, what a request ran


class Gate:
    """Who calls: the token's identity when the service is checked, else the TLS client certificate's."""

    def __init__(self, tokens: ServiceTokens):
        self._tokens = tokens

    def identities(self, request: Request, service: str = INFERENCE, open_route: bool = False) -> list[bytes] | None:
        tokens = self._tokens.of(service)
        if tokens is None or open_route:
            return request.scope.get("state", {}).get(PEER_IDENTITIES)
        identity = tokens.identify(bearer_token(request.headers.items()))
        if identity is None:
            raise Aborted(status_pb2.Status(code=UNAUTHENTICATED, message=UNAUTHENTICATED_MESSAGE))
        return [identity.encode()]


def wants_events(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "") or request.query_params.get("stream") == "true"


async def streamed(handler: Callable, message: Message | list[Message], identities: list[bytes] | None,
                   deadline: float | None, events: bool) -> Response:
    """A server-streaming call's responses as events, or as one JSON array once the call has ended."""
    if events:
        async def produce(send: sse.Send) -> None:
            async def write(response: Message) -> None:
                await send(to_json(response))

            await run(handler, message, HttpContext(identities, write, deadline))

        return await sse.event_stream(produce, error_event)
    responses: list[dict] = []

    async def collect(response: Message) -> None:
        responses.append(to_json(response))

    await run(handler, message, HttpContext(identities, collect, deadline))
    return JSONResponse(responses)


def rpc_endpoint(route: Route, handler: Callable, gate: Gate, max_body_bytes: int) -> Callable:
    async def endpoint(request: Request) -> Response:
        request.scope[METHOD] = route.name
        try:
            identities, deadline = gate.identities(request, route.service, route.open), deadline_of(request)
            if route.verb == "POST":
                body = await json_body(request, max_body_bytes)
            else:  # no body: the fields the route takes from the query string
                body = {name: request.query_params[name] for name in route.query if name in request.query_params}
            message = parse(route, body if body is not None else ([] if route.method.client_streaming else {}),
                            request.path_params)
            if route.method.server_streaming:
                return await streamed(handler, message, identities, deadline, wants_events(request))
            response = await run(handler, message, HttpContext(identities, deadline=deadline))
        except Exception as error:  # noqa: BLE001  (every failure is answered: errors.to_status maps it)
            return error_response(error)
        unready = route.unready_is_503 and response.status != health_pb2.HealthCheckResponse.SERVING
        return JSONResponse(to_json(response), 503 if unready else 200)

    endpoint.__name__ = route.name
    return endpoint


class Measured:
    """ASGI middleware: each finished request reported to `metrics` with its method and HTTP code."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics):
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started, code = time.perf_counter(), 500

        async def sending(message: AsgiMessage) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, sending)
        finally:
            self._metrics.record(scope.get(METHOD, "other"), code, time.perf_counter() - started)


async def no_route(request: Request, error: HTTPException) -> Response:
    """Starlette's own refusals (no such path, or not with this verb) in the same JSON as every error."""
    status = "NOT_FOUND" if error.status_code == 404 else "UNIMPLEMENTED"
    return JSONResponse({"error": {"code": error.status_code, "status": status, "details": [],
                                   "message": f"{request.method} {request.url.path}: {error.detail}"}},
                        error.status_code, headers=error.headers)


async def playground(request: Request) -> Response:
    """The playground page (static/): plain HTML, CSS and JavaScript over the routes above."""
    request.scope[METHOD] = "Playground"
    return FileResponse(STATIC / "index.html")


def create_app(servicers: Mapping[str, object], tokens: ServiceTokens, metrics: HttpMetrics | None,
               max_body_bytes: int) -> ASGIApp:
    """The app for `servicers` (by full service name), checking `tokens`: a route per row of the
    table, then the face's own pages: its OpenAPI document, /v1/completions and the playground. A body
    over `max_body_bytes` is refused, as gRPC refuses a message over --max-message-bytes."""
    gate = Gate(tokens)
    spec = openapi.document(ROUTES, completions.OPENAPI_PATHS)

    async def openapi_json(request: Request) -> Response:
        request.scope[METHOD] = "OpenAPI"
        return JSONResponse(spec)

    answer_completions = completions.Completions(servicers[INFERENCE], gate.identities, METHOD,
                                                 max_body_bytes).endpoint
    app: ASGIApp = Starlette(routes=[
        *(StarletteRoute(route.path, rpc_endpoint(route, getattr(servicers[route.service], route.name), gate,
                                                  max_body_bytes), methods=[route.verb]) for route in ROUTES),
        StarletteRoute("/openapi.json", openapi_json, methods=["GET"]),
        StarletteRoute("/v1/completions", answer_completions, methods=["POST"]),
        StarletteRoute("/", playground, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], exception_handlers={HTTPException: no_route})
    return app if metrics is None else Measured(app, metrics)


def create_face(settings: Settings, servicers: Mapping[str, object], metrics: HttpMetrics | None) -> WebFace:
    """The HTTP face for `settings.http_listen`, bound now; its requests counted in `metrics` (None: metrics off)."""
    tokens = ServiceTokens.from_files(settings.auth_tokens_file, ADMIN, settings.admin_tokens_file)
    return WebFace(create_app(servicers, tokens, metrics, settings.max_message_bytes), settings)
