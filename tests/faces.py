"""The two faces of one server behind one interface: `call(rpc, request)` with requests and answers as
protobuf's JSON mapping, so that a test can run the same scenario over gRPC and over HTTP and compare.

A failure is a `Failed` with the gRPC status name, the message and the details (each a dict with its
"@type"), read from the trailers over gRPC and from the JSON error body over HTTP; over HTTP it also
keeps the HTTP code. Routes come from the server's own table, so every row is exercised as written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
import httpx
from google.protobuf import json_format
from google.protobuf.message_factory import GetMessageClass
from grpc_status import rpc_status

from conftest import LOOPBACK
from rnnserve.server.faces.web.calls import to_json
from rnnserve.server.faces.web.routes import ADMIN, INFERENCE, ROUTES
from rnnserve.server.faces.web.status import CODES
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2
from serving import RunningServer

# Each RPC's first route: GetModel's names the model alone (its second, /v1/models/{name}/{version}, a version too).
# No two of rnnserve's services have a method of the same name.
ROUTE_OF = {route.name: route for route in reversed(ROUTES) if route.service in (INFERENCE, ADMIN)}


ALICE, BOB = "token-of-alice-0123456789", "token-of-bob-0123456789"


def serve_both_faces(bundle, folder, **settings) -> RunningServer:
    """A server with both faces on loopback ports, checking the tokens of ALICE and BOB (and `settings`)."""
    tokens = folder / "tokens"
    tokens.write_text(f"{ALICE} alice\n{BOB} bob\n")
    return RunningServer(bundle, Settings(**LOOPBACK, http_listen="127.0.0.1:0", auth_tokens_file=tokens, **settings))


@dataclass
class Failed(Exception):
    status: str  # the gRPC status name, e.g. "NOT_FOUND"
    message: str
    details: list[dict]
    http_code: int | None = None


class GrpcFace:
    name = "grpc"

    def __init__(self, address: str, token: str | None = None, service: str = "Inference"):
        self._channel = grpc.insecure_channel(address)
        self._metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        self._service = rnnserve_pb2.DESCRIPTOR.services_by_name[service]

    def call(self, rpc: str, request: dict | list, timeout: float | None = None):
        method = self._service.methods_by_name[rpc]
        in_class, out_class = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        kind = ("stream" if method.client_streaming else "unary") + ("_stream" if method.server_streaming else "_unary")
        callable_ = getattr(self._channel, kind)(f"/{self._service.full_name}/{rpc}",
                                                 request_serializer=in_class.SerializeToString,
                                                 response_deserializer=out_class.FromString)
        message = ([json_format.ParseDict(item, in_class()) for item in request] if method.client_streaming
                   else json_format.ParseDict(request, in_class()))
        try:
            answer = callable_(iter(message) if method.client_streaming else message, metadata=self._metadata,
                               timeout=timeout)
            return [to_json(item) for item in answer] if method.server_streaming else to_json(answer)
        except grpc.RpcError as error:
            status = rpc_status.from_call(error)
            details = [] if status is None else [json_format.MessageToDict(d, preserving_proto_field_name=True)
                                                 for d in status.details]
            raise Failed(error.code().name, error.details(), details) from None

    def close(self) -> None:
        self._channel.close()


class HttpFace:
    name = "http"

    def __init__(self, base_url: str, token: str | None = None, **options):
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=30, **options)

    def call(self, rpc: str, request: dict | list, events: bool = False):
        route = ROUTE_OF[rpc]
        path = route.path
        body = request
        if isinstance(request, dict):
            body = dict(request)
            for field in route.path_fields:
                path = path.replace("{" + field + "}", str(body.pop(field, "")))
        headers = {"accept": "text/event-stream"} if events else {}
        response = self.http.request(route.verb, path, json=body if route.verb == "POST" else None,
                                     headers=headers)
        if response.status_code != 200:
            error = response.json()["error"]
            raise Failed(error["status"], error["message"], error["details"], response.status_code)
        if events:
            return read_events(response.text)
        return response.json()

    def close(self) -> None:
        self.http.close()


def read_events(text: str) -> list[dict]:
    """The data of each server-sent event; an `error` event raises it as `Failed`."""
    found = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(lines["data"])
        if lines.get("event") == "error":
            error = data["error"]
            raise Failed(error["status"], error["message"], error["details"], error["code"])
        found.append(data)
    return found


def status_name(code: int) -> str:
    return CODES[code].name
