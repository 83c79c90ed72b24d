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

from rnnserve import wire_numbers
from rnnserve.client.errors import FieldViolation, InvalidArgument
from rnnserve.v1 import rnnserve_pb2 as pb

M = TypeVar("M", bound=Message)

# Tokens to feed: text (encoded by the server with the model's vocabulary) or token ids.
Tokens = Union[str, Sequence[int]]

DEFAULT_TOP_K = 5


def _message(message_class: type[M], **fields: object) -> M:
    """`message_class(**fields)`, each integer as the wire can carry it (`wire_numbers.carried`): a number outside
    its field's wire type is sent as a stand-in the server refuses naming the field's real range, or refused here
    naming the wire's (InvalidArgument), rather than a traceback from inside protobuf."""
    integers = _integer_fields(message_class)
    for name, value in fields.items():
        field = integers.get(name)
        if field is None or value is None:
            continue
        try:
            fields[name] = [wire_numbers.carried(field, v) for v in value] if isinstance(value, (list, tuple)) \
                else wire_numbers.carried(field, value)
        except ValueError as error:
            raise _invalid(name, str(error)) from None
    try:
        return message_class(**fields)
    except UnicodeEncodeError as error:  # a str holding lone surrogates: bytes that were not UTF-8 (PEP 383)
        name = next(name for name, value in fields.items() if _unencodable(value))
        raise _invalid(name, f"not UTF-8 text: character {error.start} is a lone surrogate "
                             f"({error.object[error.start]!r}), which is what Python makes of bytes that are not "
                             f"UTF-8") from None


def _unencodable(value: object) -> bool:
    texts = value if isinstance(value, (list, tuple)) else (value,)
    return any(isinstance(text, str) and not text.isascii() and _has_surrogate(text) for text in texts)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _invalid(name: str, description: str) -> InvalidArgument:
    return InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {description}", reason="INVALID_ARGUMENT",
                           field_violations=(FieldViolation(name, description),))


@functools.cache
def _integer_fields(message_class: type[Message]) -> dict[str, FieldDescriptor]:
    """The integer fields of a message, looked up once per message type (a step builds one request per token:
    its descriptors are not read again each time)."""
    return {field.name: field for field in message_class.DESCRIPTOR.fields if field.type in wire_numbers.RANGES}


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
