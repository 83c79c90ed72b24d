"""The OpenAPI document of the HTTP face, generated from the route table and the messages' descriptors.

Every request and response schema is the protobuf message in protobuf's JSON mapping, walked from
its descriptor: so a field added to the .proto, or a route added to `routes.ROUTES`, appears here
without anyone writing it twice. 64-bit integers are strings in that mapping (and accepted as
numbers); enums are their value names; google.protobuf.Timestamp is an RFC 3339 string.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from importlib import metadata

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from rnnserve.server.faces.web.routes import Route

F = FieldDescriptor
_INTEGERS = {  # type: (minimum, maximum)
    F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1), F.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
}
_LONGS = {
    F.TYPE_INT64: (-2**63, 2**63 - 1), F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}
_SCALARS = {F.TYPE_DOUBLE: {"type": "number"}, F.TYPE_FLOAT: {"type": "number"}, F.TYPE_BOOL: {"type": "boolean"},
            F.TYPE_STRING: {"type": "string"}, F.TYPE_BYTES: {"type": "string", "format": "byte"}}
_WELL_KNOWN = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    "google.protobuf.Any": {"type": "object", "required": ["@type"], "properties": {"@type": {"type": "string"}},
                            "additionalProperties": True},
}
ERROR = {  # status.error_body
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["code", "status", "message", "details"], "additionalProperties": False,
        "properties": {"code": {"type": "integer", "description": "the HTTP status code"},
                       "status": {"type": "string", "description": "the gRPC status code's name"},
                       "message": {"type": "string"},
                       "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]}}}},
}


EVENT = {  # one server-sent event: a message as one line of JSON, or the Error that ends the stream
    "type": "object", "required": ["data"],
    "properties": {"event": {"type": "string", "enum": ["message", "error"]}, "data": {"type": "string"}},
}


class Schemas:
    """JSON schemas of messages, each kept once in `components` and referred to by name."""

    def __init__(self) -> None:
        self.components: dict[str, dict] = {"Error": ERROR}

    def message(self, descriptor: Descriptor) -> dict:
        if descriptor.full_name in _WELL_KNOWN:
            return _WELL_KNOWN[descriptor.full_name]
        name = descriptor.full_name.replace(".", "_")
        if name not in self.components:
            self.components[name] = {}  # placed before walking, so a message that contains itself ends
            self.components[name] = {
                "type": "object", "additionalProperties": False,
                "properties": {field.name: self.field(field) for field in descriptor.fields}}
        return {"$ref": f"#/components/schemas/{name}"}

    def field(self, field: FieldDescriptor) -> dict:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            return {"type": "object", "additionalProperties": self.value(field.message_type.fields_by_name["value"])}
        value = self.value(field)
        return {"type": "array", "items": value} if field.is_repeated else value

    def value(self, field: FieldDescriptor) -> dict:
        if field.type == F.TYPE_MESSAGE:
            return self.message(field.message_type)
        if field.type == F.TYPE_ENUM:
            return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
        if field.type in _INTEGERS:
            low, high = _INTEGERS[field.type]
            return {"type": "integer", "minimum": low, "maximum": high}
        if field.type in _LONGS:
            low, high = _LONGS[field.type]
            return {"oneOf": [{"type": "string", "pattern": "^-?[0-9]+$"},
                              {"type": "integer", "minimum": low, "maximum": high}]}
        return dict(_SCALARS[field.type])


def _operation(route: Route, operation_id: str, schemas: Schemas) -> dict:
    method = route.method
    request, response = schemas.message(method.input_type), schemas.message(method.output_type)
    fields = {field.name: field for field in method.input_type.fields}
    parameters = [{"name": name, "in": "path", "required": True, "schema": schemas.field(fields[name])}
                  for name in route.path_fields]
    parameters += [{"name": name, "in": "query", "required": False, "schema": schemas.field(fields[name])}
                   for name in route.query]
    if method.server_streaming:
        parameters.append({"name": "stream", "in": "query", "required": False,
                           "description": "true: server-sent events, as with Accept: text/event-stream",
                           "schema": {"type": "string", "enum": ["true", "false"]}})
        content = {"application/json": {"schema": {"type": "array", "items": response}},
                   "text/event-stream": {"schema": EVENT}}
    else:
        content = {"application/json": {"schema": response}}
    operation = {
        "operationId": operation_id, "summary": route.summary,
        "description": f"gRPC {route.rpc}: the request body is {method.input_type.full_name} in protobuf's JSON "
                       f"mapping" + (", a JSON array of them." if method.client_streaming else "."),
        "parameters": parameters,
        "responses": {"200": {"description": method.output_type.full_name, "content": content},
                      "default": {"description": "an error", "content": {
                          "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
    }
    if route.unready_is_503:
        operation["responses"]["503"] = {"description": "not serving", "content": content}
    if route.verb == "POST":
        body = {"type": "array", "items": request} if method.client_streaming else request
        operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    if not route.open:
        operation["security"] = [{"bearer": []}, {}]
    return operation


def document(routes: Sequence[Route], extra_paths: dict | None = None) -> dict:
    """The OpenAPI 3.0 document of `routes`, plus `extra_paths` written by hand (completions)."""
    schemas = Schemas()
    names = Counter(route.name for route in routes)
    paths: dict[str, dict] = {}
    for route in routes:
        operation_id = route.name if names[route.name] == 1 else route.name + route.path.replace("/", "_")
        paths.setdefault(route.path, {})[route.verb.lower()] = _operation(route, operation_id, schemas)
    for path, operations in (extra_paths or {}).items():
        paths.setdefault(path, {}).update(operations)
    return {
        "openapi": "3.0.3",
        "info": {"title": "rnnserve", "version": metadata.version("rnnserve"),
                 "description": "The rnnserve.v1 Inference and Admin services over HTTP/JSON; the same operations, "
                                "errors, sessions and tokens as gRPC (with tokens on, the Admin routes take only "
                                "the admin tokens). A call's deadline, if it has one, is the X-Server-Timeout "
                                "header in seconds: past it the call is cancelled and answers 504 "
                                "DEADLINE_EXCEEDED, as over gRPC."},
        "paths": paths,
        "components": {"schemas": schemas.components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "when the server checks tokens"}}},
    }
