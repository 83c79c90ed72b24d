"""The one table from HTTP routes to RPCs: each row names the gRPC method its request goes to.

A JSON body is the method's request message in protobuf's JSON mapping, with the route's path
parameters merged in as fields of the same name; a GET or DELETE, which has no body, takes the
fields its row names in `query` from the query string. A method that takes a stream of requests takes
a JSON array of them; a method that answers a stream answers a JSON array, or server-sent events
when the caller asks for `text/event-stream` (or `?stream=true`). So a new RPC is one row here,
and the OpenAPI document (`openapi`) is generated from the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2  # noqa: F401  (puts grpc.health.v1 in the descriptor pool)

from rnnserve.v1 import rnnserve_pb2  # noqa: F401  (puts rnnserve.v1 in the descriptor pool)

INFERENCE = "rnnserve.v1.Inference"
ADMIN = "rnnserve.v1.Admin"
HEALTH = "grpc.health.v1.Health"


@dataclass(frozen=True)
class Route:
    verb: str  # the HTTP method
    path: str  # Starlette's syntax; each {name} is a field of the request message
    rpc: str  # "package.Service.Method"
    summary: str
    fixed: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))  # fields the route sets
    query: tuple[str, ...] = ()  # string fields a GET or DELETE takes from the query string, each optional
    open: bool = False  # served without a bearer token (probes have none)
    unready_is_503: bool = False  # a health answer other than SERVING is HTTP 503, for load balancers

    @property
    def method(self) -> MethodDescriptor:
        return descriptor_pool.Default().FindMethodByName(self.rpc)

    @property
    def service(self) -> str:
        return self.method.containing_service.full_name

    @property
    def name(self) -> str:
        """The RPC's name, as the metrics' `method` label has it for gRPC calls."""
        return self.method.name

    @property
    def path_fields(self) -> list[str]:
        return [part[1:-1] for part in self.path.split("/") if part.startswith("{")]


MODEL_VERSION = ("model", "model_version")  # whose named states: each model version has its own

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/sessions", f"{INFERENCE}.CreateSession", "Open a session, optionally with a prompt"),
    Route("GET", "/v1/sessions/{session_id}", f"{INFERENCE}.GetSession", "Describe a session"),
    Route("DELETE", "/v1/sessions/{session_id}", f"{INFERENCE}.CloseSession", "Close a session"),
    Route("POST", "/v1/sessions/{session_id}/step", f"{INFERENCE}.Step", "Feed tokens, get the next-token prediction"),
    Route("POST", "/v1/sessions/{session_id}/generate", f"{INFERENCE}.Generate",
          "Continue a session on the server: a JSON array of tokens, or server-sent events"),
    Route("POST", "/v1/stream", f"{INFERENCE}.Stream", "Many steps, of one session or several, answered in order"),
    Route("POST", "/v1/step-batch", f"{INFERENCE}.StepBatch", "One step for each of many sessions"),
    Route("POST", "/v1/sessions/{session_id}/fork", f"{INFERENCE}.ForkSession",
          "New sessions from this one's state and position"),
    Route("POST", "/v1/sessions/{session_id}/reset", f"{INFERENCE}.ResetSession", "Back to the initial state"),
    Route("POST", "/v1/sessions/{session_id}/rewind", f"{INFERENCE}.RewindSession", "Undo the last tokens read"),
    Route("POST", "/v1/sessions/{session_id}/score", f"{INFERENCE}.Score",
          "Log-probabilities of candidate continuations; the session does not advance"),
    Route("POST", "/v1/sessions/{session_id}/peek", f"{INFERENCE}.Peek",
          "The prediction after hypothetical tokens; the session does not advance"),
    Route("POST", "/v1/sessions/{session_id}/export", f"{INFERENCE}.ExportSession",
          "The session as a portable blob (base64 in JSON)"),
    Route("POST", "/v1/sessions/import", f"{INFERENCE}.ImportSession", "A new session from an exported blob"),
    Route("POST", "/v1/states", f"{INFERENCE}.RegisterState", "Register the state after a prompt, by name"),
    Route("GET", "/v1/states", f"{INFERENCE}.ListStates", "The named states of a model version the caller may use "
          "(default: the default's): those for everyone and its own", query=MODEL_VERSION),
    Route("DELETE", "/v1/states/{name}", f"{INFERENCE}.DeleteState", "Forget one of the caller's registered states",
          query=MODEL_VERSION),
    Route("GET", "/v1/models", f"{INFERENCE}.ListModels", "The loaded models"),
    Route("GET", "/v1/models/{name}", f"{INFERENCE}.GetModel", "One loaded model, its default version"),
    Route("GET", "/v1/models/{name}/{version}", f"{INFERENCE}.GetModel", "One loaded model version"),
    # The Admin service's, for operators: with tokens on, only the admin tokens open them.
    Route("POST", "/v1/admin/models/{name}/{version}/load", f"{ADMIN}.LoadModel",
          "Load a version from the model repository, checked first (make_default: then the model's default)"),
    Route("POST", "/v1/admin/models/{name}/{version}/unload", f"{ADMIN}.UnloadModel",
          "Stop serving a version: at once, or once its running sessions end"),
    Route("POST", "/v1/admin/models/{name}/{version}/default", f"{ADMIN}.SetDefaultModel",
          "Make a version its model's default for new sessions (server_default: the model the server's too)"),
    Route("POST", "/v1/admin/states", f"{ADMIN}.RegisterSharedState",
          "Register the state after a prompt, by name, for every caller (read-only to callers)"),
    Route("DELETE", "/v1/admin/states/{name}", f"{ADMIN}.DeleteSharedState", "Forget a state shared with every caller",
          query=MODEL_VERSION),
    Route("GET", "/healthz", f"{HEALTH}.Check", "Liveness: the process answers", MappingProxyType({"service": ""}),
          open=True),
    Route("GET", "/readyz", f"{HEALTH}.Check", "Readiness: 503 while the server starts or drains",
          MappingProxyType({"service": INFERENCE}), open=True, unready_is_503=True),
)
