"""The v2 protocol's REST routes (/v2/...) as a Starlette app, over the same `Inference` as its gRPC service.

A request body is the protocol's JSON, optionally followed by binary tensor data (Triton's binary
data extension, which tritonclient.http uses by default): the header Inference-Header-Content-Length
says where the JSON ends, and each input with parameters.binary_data_size takes that many bytes, in
order. Outputs are answered as JSON `data`, or as binary data when the request asks (an output's
parameters.binary_data, or the request's parameters.binary_data_output). Tokens, client certificates
and metrics are the HTTP face's (`web.app.Gate`, `Measured`); errors are {"error": message}, as
Triton answers them, with the HTTP code of the error's gRPC code.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from rnnserve.server.core.engine import Engine
from rnnserve.server.core.errors import InvalidArgument, RnnserveError
from rnnserve.server.faces.auth import ServiceTokens, caller
from rnnserve.server.faces.kserve import describe, tensors
from rnnserve.server.faces.kserve.infer import InferAnswer, InferCall, Inference
from rnnserve.server.faces.web.app import METHOD, Gate, Measured
from rnnserve.server.faces.web.calls import HttpContext, deadline_of, raw_body, status_of
from rnnserve.server.faces.web.status import http_code
from rnnserve.server.metrics import HttpMetrics

SERVICE = "inference.GRPCInferenceService"  # whose tokens open these routes: the callers', as on gRPC
HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL = "/v2/models/{name}"
VERSION = "/v2/models/{name}/versions/{version}"


def error_response(error: BaseException) -> JSONResponse:
    status = status_of(error)
    return JSONResponse({"error": status.message}, http_code(status))


def _read_call(body: bytes, header_length: str | None, name: str, version: str) -> tuple[InferCall, bool | set[str]]:
    """The request's call, and which outputs it asks for as binary data: True for all, else a set of names."""
    json_length = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidArgument(HEADER_LENGTH, f"the JSON's length in bytes, at most the body's ({len(body)})")
        json_length = int(header_length)
    try:
        request = json.loads(body[:json_length])
    except ValueError as error:
        raise InvalidArgument("request", f"the body is not JSON: {error}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise InvalidArgument("inputs", "a JSON object with an 'inputs' array")
    parameters = _object(request.get("parameters", {}), "parameters")
    binary, offset = body[json_length:], 0
    inputs = []
    for tensor in request["inputs"]:
        tensor = _object(tensor, "inputs[]")
        name_of, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name_of, str) or datatype not in tensors.DATATYPES or not isinstance(shape, list) or \
                not all(isinstance(size, int) for size in shape):
            raise InvalidArgument("inputs", "each input has a name, a datatype of the protocol's and a shape (a list "
                                            f"of integers); got {json.dumps(tensor)[:200]}")
        size = _object(tensor.get("parameters", {}), f"{name_of}.parameters").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
                raise InvalidArgument(name_of, f"binary_data_size {size!r}: the input's bytes after the JSON, "
                                               f"{len(binary) - offset} left")
            data = tensors.from_raw(name_of, datatype, shape, binary[offset:offset + size])
            offset += size
        else:
            data = tensors.from_list(name_of, datatype, shape, _elements(tensor.get("data"), datatype, name_of))
        inputs.append(tensors.Tensor(name_of, datatype, data))
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("outputs", "a JSON array of the outputs asked for")
    outputs = [_object(output, "outputs[]") for output in outputs]
    names = [output.get("name") for output in outputs]
    if not all(isinstance(output_name, str) for output_name in names):
        raise InvalidArgument("outputs", "each output asked for has a name")
    binary_outputs = {output["name"] for output in outputs
                      if _object(output.get("parameters", {}), f"{output['name']}.parameters").get("binary_data")}
    call = InferCall(name, version, str(request.get("id", "")), parameters, inputs, names)
    return call, bool(parameters.get("binary_data_output")) or binary_outputs


def _object(value: object, field: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(field, "a JSON object")
    return value


def _elements(data: object, datatype: str, name: str) -> list:
    """JSON data, flattened (the protocol allows nested rows); BYTES as UTF-8 bytes."""
    if not isinstance(data, list):
        raise InvalidArgument(name, "'data' (a JSON array) or parameters.binary_data_size")
    flat: list = []
    stack = [iter(data)]
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                stack.append(iter(element))
                break
            flat.append(element.encode() if datatype == tensors.BYTES and isinstance(element, str) else element)
        else:
            stack.pop()
    return flat


def _answer(answer: InferAnswer, binary: bool | set[str]) -> Response:
    """The response: JSON, each output its `data` or, where asked for, binary data after the JSON."""
    outputs, chunks = [], []
    for tensor in answer.outputs:
        output = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary is True or (isinstance(binary, set) and tensor.name in binary):
            raw = tensors.to_raw(tensor)
            output["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            output["data"] = tensors.to_list(tensor)
        outputs.append(output)
    body = {"model_name": answer.model_name, "model_version": answer.model_version, "outputs": outputs,
            "parameters": dict(answer.parameters)}
    if answer.id:
        body["id"] = answer.id
    header = json.dumps(body).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def create_app(engine: Engine, inference: Inference, tokens: ServiceTokens, metrics: HttpMetrics | None,
               max_body_bytes: int, idle_seconds: int) -> ASGIApp:
    """The /v2 routes; health is open to callers without a token (probes have none), the rest take the callers'."""
    gate = Gate(tokens)

    def endpoint(method: str, answer: Callable[[Request, list[bytes] | None], Awaitable[Response]],
                 open_route: bool = False):
        """The route's endpoint: the caller checked (tokens, client certificate) before `answer` runs."""
        async def run(request: Request) -> Response:
            request.scope[METHOD] = method
            try:
                return await answer(request, gate.identities(request, SERVICE, open_route))
            except Exception as error:  # noqa: BLE001  (every failure is answered: errors.to_status maps it)
                return error_response(error)

        return run

    def named(request: Request) -> tuple[str, str]:
        return request.path_params["name"], request.path_params.get("version", "")

    async def live(request: Request, _identities: list[bytes] | None) -> Response:
        return Response(status_code=200)

    async def ready(request: Request, _identities: list[bytes] | None) -> Response:
        return Response(status_code=200 if engine.ready else 503)

    async def model_ready(request: Request, _identities: list[bytes] | None) -> Response:
        try:
            model = inference.model(*named(request))
        except RnnserveError:
            return Response(status_code=404)
        return Response(status_code=200 if engine.ready and not model.retiring else 503)

    async def server_metadata(request: Request, _identities: list[bytes] | None) -> Response:
        return JSONResponse(describe.server_metadata())

    async def model_metadata(request: Request, _identities: list[bytes] | None) -> Response:
        return JSONResponse(describe.model_metadata(inference, *named(request)))

    async def model_config(request: Request, _identities: list[bytes] | None) -> Response:
        return JSONResponse(describe.model_config(inference, *named(request), idle_seconds))

    async def infer(request: Request, identities: list[bytes] | None) -> Response:
        body = await raw_body(request, max_body_bytes)
        call, binary = _read_call(body, request.headers.get(HEADER_LENGTH), *named(request))
        answer = await inference.infer(call, caller(HttpContext(identities)), deadline_of(request))
        return _answer(answer, binary)

    routes = [Route("/v2/health/live", endpoint("ServerLive", live, open_route=True), methods=["GET"]),
              Route("/v2/health/ready", endpoint("ServerReady", ready, open_route=True), methods=["GET"]),
              Route("/v2", endpoint("ServerMetadata", server_metadata), methods=["GET"])]
    for path in (MODEL, VERSION):
        routes += [Route(path, endpoint("ModelMetadata", model_metadata), methods=["GET"]),
                   Route(path + "/ready", endpoint("ModelReady", model_ready), methods=["GET"]),
                   Route(path + "/config", endpoint("ModelConfig", model_config), methods=["GET"]),
                   Route(path + "/infer", endpoint("ModelInfer", infer), methods=["POST"])]

    async def no_route(request: Request, error: HTTPException) -> Response:
        return JSONResponse({"error": f"{request.method} {request.url.path}: {error.detail}"}, error.status_code)

    app: ASGIApp = Starlette(routes=routes, exception_handlers={HTTPException: no_route})
    return app if metrics is None else Measured(app, metrics)
