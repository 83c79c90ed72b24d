"""Request messages from Python arguments, shared by the sync and asyncio clients.

Python's `None` means "the server's default" here; it becomes the proto's unset or zero value,
so a default is decided in one place only, on the server.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TypeVar, Union

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from rnnserve.client.errors import FieldViolation, InvalidArgument
from rnnserve.v1 import rnnserve_pb2 as pb

M = TypeVar("M", bound=Message)
# What each integer wire type holds: a Python int outside it makes protobuf raise a bare ValueError that names
# no field, so it is refused here first, as the server refuses a field out of its range.
_WIRE_RANGES = {FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
                FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1)}

# Tokens to feed: text (encoded by the server with the model's vocabulary) or token ids.
Tokens = Union[str, Sequence[int]]

DEFAULT_TOP_K = 5


def _message(message_class: type[M], **fields: object) -> M:
    """`message_class(**fields)`, with every integer checked against its wire type: InvalidArgument naming the
    field and its range, not a traceback from inside protobuf, for what a caller (or a CLI flag) can type."""
    limits_of = _integer_fields(message_class)
    for name, value in fields.items():
        limits = limits_of.get(name)
        if limits is None or value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else (value,)
        if any(not limits[0] <= v <= limits[1] for v in values):
            description = f"must be in [{limits[0]}, {limits[1]}], got {value}"
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {description}",
                                  reason="INVALID_ARGUMENT", field_violations=(FieldViolation(name, description),))
    return message_class(**fields)


@functools.cache
def _integer_fields(message_class: type[Message]) -> dict[str, tuple[int, int]]:
    """The wire range of each integer field of a message, looked up once per message type (a step builds one
    request per token: its descriptors are not read again each time)."""
    return {field.name: _WIRE_RANGES[field.type] for field in message_class.DESCRIPTOR.fields
            if field.type in _WIRE_RANGES}


def version(value: str | int | None) -> str | None:
    """A model version as the wire holds it, a string ("2"); a caller may write it as the number it names."""
    return None if value is None else str(value)


def _feed(tokens: Tokens | None) -> dict:
    if isinstance(tokens, str):
        return {"text": tokens}
    return {"token_ids": [] if tokens is None else list(tokens)}


def _prompt(prompt: Tokens | None) -> dict:
    """A prompt's fields, named as CreateSessionRequest and RegisterStateRequest name them."""
    feed = _feed(prompt)
    return {"prompt_text": feed.get("text"), "prompt_token_ids": feed.get("token_ids")}


def create_session(model: str | None, model_version: str | int | None, prompt: Tokens | None, ttl: int | None,
                   top_k: int, temperature: float | None, initial_state: str | None) -> pb.CreateSessionRequest:
    return _message(pb.CreateSessionRequest, model=model, model_version=version(model_version), **_prompt(prompt),
                    ttl_seconds=ttl, top_k=top_k, temperature=temperature, initial_state=initial_state)


def step(session_id: str, tokens: Tokens, top_k: int, temperature: float | None,
         expected_position: int | None) -> pb.StepRequest:
    return _message(pb.StepRequest, session_id=session_id, **_feed(tokens), top_k=top_k, temperature=temperature,
                    expected_position=expected_position)


def generate(session_id: str, tokens: Tokens | None, max_tokens: int, temperature: float, top_k: int | None,
             top_p: float | None, seed: int | None, stop: Sequence[str],
             expected_position: int | None) -> pb.GenerateRequest:
    return _message(pb.GenerateRequest, session_id=session_id, **_feed(tokens), max_tokens=max_tokens,
                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=list(stop),
                    expected_position=expected_position)


def fork(session_id: str, count: int, ttl: int | None, expected_position: int | None) -> pb.ForkSessionRequest:
    if count < 1:  # the wire reads 0 as 1: refused here, so that fork(0) cannot quietly make a session
        raise ValueError(f"count must be at least 1, got {count}")
    return _message(pb.ForkSessionRequest, session_id=session_id, count=count, ttl_seconds=ttl,
                    expected_position=expected_position)


def rewind(session_id: str, tokens: int, top_k: int, temperature: float | None,
           expected_position: int | None) -> pb.RewindSessionRequest:
    return _message(pb.RewindSessionRequest, session_id=session_id, tokens=tokens, top_k=top_k,
                    temperature=temperature, expected_position=expected_position)


def score(session_id: str, continuations: Sequence[Tokens], expected_position: int | None) -> pb.ScoreRequest:
    return _message(pb.ScoreRequest, session_id=session_id,
                    continuations=[_message(pb.Continuation, **_feed(c)) for c in continuations],
                    expected_position=expected_position)


def import_session(state: bytes, ttl: int | None, top_k: int, temperature: float | None) -> pb.ImportSessionRequest:
    return _message(pb.ImportSessionRequest, state=state, ttl_seconds=ttl, top_k=top_k, temperature=temperature)


def register_state(name: str, prompt: Tokens, model: str | None,
                   model_version: str | int | None) -> pb.RegisterStateRequest:
    return _message(pb.RegisterStateRequest, name=name, **_prompt(prompt), model=model,
                    model_version=version(model_version))
