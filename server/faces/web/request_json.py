"""A JSON body to a request message, refused in the terms the .proto and the gRPC face use.

protobuf's `ParseDict` does the conversion, but its errors are written for protobuf's authors:
an unknown field lists the fields in camelCase, and a number out of its wire type is quoted
whole (1e300 as 301 digits) under the wire type's range, not the field's. So the body is walked
first, against the message's descriptor:
- a key that is no field (by its .proto name, or the camelCase one protobuf's JSON mapping also
  reads) is refused naming it and listing the fields as the .proto spells them;
- an integer field's number (or a string holding one, which protobuf's JSON mapping also reads):
  a fraction is refused; a number the wire cannot hold becomes the
  stand-in of `rnnserve.wire_numbers`, which the servicer refuses naming the field's real range,
  the same message gRPC callers get; where there is no stand-in, the wire type's range is the
  field's, and the number is quoted compactly.
"""

from __future__ import annotations

import math

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from rnnserve import wire_numbers
from rnnserve.server.core.errors import InvalidArgument

# A ParseError quotes the value it could not read; a caller's value may be long, and comes back in the answer.
MAX_QUOTED_CHARS = 200


def parse(message_class: type[Message], body: dict) -> Message:
    """`body` as a `message_class`; InvalidArgument naming the field (dotted, indexed: steps[2].top_k) otherwise."""
    checked = _checked(message_class.DESCRIPTOR, body, "")
    try:
        return json_format.ParseDict(checked, message_class())
    except json_format.ParseError as error:
        message = str(error)
        if len(message) > MAX_QUOTED_CHARS:
            message = message[:MAX_QUOTED_CHARS] + "..."
        raise InvalidArgument("request", message) from None


def _checked(descriptor: Descriptor, body: dict, path: str) -> dict:
    fields = {name: field for field in descriptor.fields for name in (field.name, field.json_name)}
    checked = {}
    for key, value in body.items():
        field = fields.get(key)
        if field is None:
            names = ", ".join(field.name for field in descriptor.fields)
            raise InvalidArgument(f"{path}{key}", f"not a field of {descriptor.name}; its fields are {names}")
        checked[key] = _value(field, value, f"{path}{field.name}")
    return checked


def _value(field: FieldDescriptor, value: object, where: str) -> object:
    if isinstance(value, list) and field.is_repeated:
        return [_one(field, item, f"{where}[{index}]") for index, item in enumerate(value)]
    return _one(field, value, where)


def _one(field: FieldDescriptor, value: object, where: str) -> object:
    if field.message_type is not None and isinstance(value, dict) and not field.message_type.GetOptions().map_entry \
            and field.message_type.full_name.startswith("rnnserve."):
        return _checked(field.message_type, value, f"{where}.")
    if field.type not in wire_numbers.RANGES or isinstance(value, bool):
        return value
    if isinstance(value, str):  # protobuf's JSON mapping reads integers from strings too ("12", "1e300")
        value = _number(value)
    if not isinstance(value, (int, float)):
        return value  # ParseDict refuses what is not a number, naming the field
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise InvalidArgument(where, f"must be a whole number, got {wire_numbers.compact(value)}")
        value = int(value)
    try:
        return wire_numbers.carried(field, value)
    except ValueError as error:
        raise InvalidArgument(where, str(error)) from None


def _number(text: str) -> int | float | str:
    """The number a string holds, as ParseDict would read it; the string itself when it holds none."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text
