"""A google.rpc.Status as an HTTP answer: the standard HTTP code of its gRPC code, and the same
details as JSON, in Google's JSON error format: {"error": {"code", "status", "message", "details"}}.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from starlette.responses import JSONResponse

from rnnserve.server.faces.web import sse
from rnnserve.server.faces.web.calls import status_of

# google/rpc/code.proto gives each code its HTTP equivalent.
HTTP_CODES = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
CODES = {code.value[0]: code for code in grpc.StatusCode}


def http_code(status: status_pb2.Status) -> int:
    return HTTP_CODES.get(CODES.get(status.code), 500)


def error_body(status: status_pb2.Status) -> dict:
    """The JSON body of a failed call; `details` are the status's details, each with its "@type"."""
    code = CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    return {"error": {"code": http_code(status), "status": code.name, "message": status.message,
                      "details": [json_format.MessageToDict(detail, preserving_proto_field_name=True)
                                  for detail in status.details]}}


def error_headers(status: status_pb2.Status) -> dict[str, str]:
    """Retry-After (whole seconds) where the status carries RetryInfo; WWW-Authenticate on a 401."""
    headers = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            headers["Retry-After"] = str(math.ceil(info.retry_delay.ToTimedelta().total_seconds()))
    if status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def error_response(error: Exception) -> JSONResponse:
    """The answer to a call that failed with `error`, mapped as gRPC maps it (`errors.to_status`)."""
    status = status_of(error)
    return JSONResponse(error_body(status), http_code(status), headers=error_headers(status))


def error_event(error: Exception) -> str:
    """The last event of a stream that failed with `error`, after events went out."""
    return sse.encode(error_body(status_of(error)), "error")
