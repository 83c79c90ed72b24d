"""An OpenAI-style POST /v1/completions, so that existing tools and the openai client can call rnnserve.

It is three calls of the Inference servicer, nothing of its own: CreateSession with the prompt,
Generate with the sampling parameters, CloseSession, all as the caller (tokens and ownership
apply). `stream: true` answers OpenAI's chunks as server-sent events ending `data: [DONE]`.

Supported: model (a loaded model's name; "" for the default), prompt (a string, a list of token ids,
or a list of one of either; not empty), max_tokens (default 16), temperature (default 1; 0 is greedy), top_p,
seed, stop (a string or a list of up to 4; left out of the text, as OpenAI does), stream, stream_options'
include_usage, logprobs 0 (each chosen token's log-probability; no alternatives), user (ignored).
`usage` also counts the prompt's characters outside the vocabulary (`unknown_characters`).
Refused with 400 naming the field: n, best_of other than 1, echo, suffix, presence and frequency
penalties other than 0, logit_bias, logprobs above 0, and any field OpenAI does not define.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rnnserve import wire_numbers
from rnnserve.server.core.errors import InvalidArgument
from rnnserve.server.faces.web import sse
from rnnserve.server.faces.web.calls import HttpContext, json_body
from rnnserve.server.faces.web.openapi import EVENT
from rnnserve.server.faces.web.status import error_event, error_response
from rnnserve.v1 import rnnserve_pb2 as pb

DEFAULT_MAX_TOKENS = 16  # OpenAI's
MAX_STOP_STRINGS = 4  # OpenAI's: its clients and tools expect a fifth refused, not silently used
FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop"}
# Accepted at OpenAI's default (or absent) only; anything else is a feature rnnserve does not have.
AT_DEFAULT_ONLY = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "presence_penalty": 0,
                   "frequency_penalty": 0, "logit_bias": None}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
         "logprobs", "user", *AT_DEFAULT_ONLY}


@dataclass(frozen=True)
class Completion:
    """A checked request: what to create, what to generate, and how to answer."""

    create: pb.CreateSessionRequest
    generate: pb.GenerateRequest
    stream: bool
    usage_in_stream: bool
    logprobs: bool


def _typed(body: dict, name: str, kinds: tuple[type, ...], default: object, what: str) -> object:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise InvalidArgument(name, f"must be {what}")
    return value


def _prompt(value: object) -> dict:
    """CreateSessionRequest fields for OpenAI's prompt forms: text, token ids, or a list of one of either.

    An empty one is refused: the session would have read nothing, so nothing predicts what follows (OpenAI
    reads a missing prompt as its end-of-text token, which a character vocabulary has not got)."""
    if isinstance(value, list) and value and all(isinstance(item, (str, list)) for item in value):
        if len(value) > 1:
            raise InvalidArgument("prompt", "one prompt per request (n and batched prompts are not supported)")
        value = value[0]
    if not value and isinstance(value, (str, list)):
        raise InvalidArgument("prompt", "required: at least one character or token id to continue from")
    if isinstance(value, str):
        return {"prompt_text": value}
    if isinstance(value, list) and all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        ids = pb.CreateSessionRequest.DESCRIPTOR.fields_by_name["prompt_token_ids"]
        return {"prompt_token_ids": [wire_numbers.carried(ids, item) for item in value]}
    raise InvalidArgument("prompt", "a string, a list of token ids, or a list of one of either")


def read(body: object) -> Completion:
    if not isinstance(body, dict):
        raise InvalidArgument("request", "a JSON object: OpenAI's completion request")
    for name in body:
        if name not in KNOWN:
            raise InvalidArgument(name, "not a field of OpenAI's completion request")
    for name, default in AT_DEFAULT_ONLY.items():
        if body.get(name, default) not in (default, None, {}):
            raise InvalidArgument(name, f"not supported: only {default!r} (see docs/API.md, /v1/completions)")
    logprobs = _typed(body, "logprobs", (int,), None, "an integer")
    if logprobs is not None and logprobs != 0:
        raise InvalidArgument("logprobs", "only 0 (the chosen tokens' log-probabilities) or null: no alternatives")
    stop = _typed(body, "stop", (str, list), [], "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(item, str) for item in stop):
        raise InvalidArgument("stop", "must be a string or a list of strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("stop", f"at most {MAX_STOP_STRINGS} strings (OpenAI's limit), got {len(stop)}")
    seed = _typed(body, "seed", (int,), None, "an integer")
    if seed is not None and not 0 <= seed < 2**64:
        raise InvalidArgument("seed", "must be in [0, 2^64)")
    # Ranges are the servicer's (its message names the field's, as gRPC's does); a number the wire cannot hold
    # goes as wire_numbers' stand-in, and a float field holds any number (1e300 as infinity, refused there too).
    max_tokens = wire_numbers.carried(pb.GenerateRequest.DESCRIPTOR.fields_by_name["max_tokens"],
                                      _typed(body, "max_tokens", (int,), DEFAULT_MAX_TOKENS, "an integer"))
    temperature = _typed(body, "temperature", (int, float), 1.0, "a number")
    top_p = _typed(body, "top_p", (int, float), 1.0, "a number")
    options = _typed(body, "stream_options", (dict,), {}, "an object")
    generate = pb.GenerateRequest(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
    create = pb.CreateSessionRequest(model=_typed(body, "model", (str,), "", "a string"),
                                     **_prompt(body.get("prompt", "")))
    return Completion(create, generate, _typed(body, "stream", (bool,), False, "true or false"),
                      options.get("include_usage") is True, logprobs == 0)


class StopsLeftOut:
    """Generated tokens, held back while they could still begin a stop string, which OpenAI leaves out.

    Generate ends with the stop string included; a token is let through once the text after it is at
    least the longest stop string's length less one, since a stop string ends on a token yet to come.
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = sorted(stops, key=len, reverse=True)
        self._hold = max(map(len, stops), default=1) - 1
        self._held: list[pb.GenerateResponse] = []

    def push(self, token: pb.GenerateResponse) -> list[pb.GenerateResponse]:
        """The tokens that can go out now; on the last one, all that remain, the stop string cut off."""
        self._held.append(token)
        if token.finish_reason == pb.FINISH_REASON_STOP:
            return self._cut()
        if token.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            out, self._held = self._held, []
            return out
        out = []
        while self._held and sum(len(held.text) for held in self._held[1:]) >= self._hold:
            out.append(self._held.pop(0))
        return out

    def _cut(self) -> list[pb.GenerateResponse]:
        text = "".join(held.text for held in self._held)
        stop = next(stop for stop in self._stops if text.endswith(stop))
        keep, out = len(text) - len(stop), []
        for held in self._held:
            if keep <= 0:
                break
            out.append(pb.GenerateResponse(text=held.text[:keep], probability=held.probability,
                                           token_id=held.token_id, position=held.position))
            keep -= len(held.text)
        self._held = []
        return out


def _choice(tokens: list[pb.GenerateResponse], finish: str | None, logprobs: bool, offset: int) -> dict:
    choice = {"text": "".join(token.text for token in tokens), "index": 0, "logprobs": None, "finish_reason": finish}
    if logprobs:
        offsets = [offset + sum(len(t.text) for t in tokens[:i]) for i in range(len(tokens))]
        choice["logprobs"] = {"tokens": [token.text for token in tokens], "top_logprobs": None,
                              "token_logprobs": [math.log(token.probability) if token.probability > 0 else None
                                                 for token in tokens], "text_offset": offsets}
    return choice


class Completions:
    """The endpoint, over the Inference servicer, for callers identified by `identities(request)`."""

    def __init__(self, servicer: object, identities: Callable[[Request], list[bytes] | None], method_key: str,
                 max_body_bytes: int):
        self._servicer = servicer
        self._identities = identities
        self._method_key = method_key
        self._max_body_bytes = max_body_bytes

    async def endpoint(self, request: Request) -> Response:
        request.scope[self._method_key] = "Completions"
        try:
            context = HttpContext(self._identities(request))
            completion = read(await json_body(request, self._max_body_bytes) or {})
            self._servicer.check_generate(completion.generate)
            created = await self._create(completion, context)
            completion.generate.session_id = created.session.session_id
            head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                    "model": created.session.model}
            if completion.stream:
                return await sse.event_stream(lambda send: self._chunks(completion, context, head, created, send),
                                              error_event, last="[DONE]")
            try:
                tokens, finish, generated = await self._generate(completion, context)
            finally:
                await self._close(completion, context)
        except Exception as error:  # noqa: BLE001  (answered as every HTTP error is)
            return error_response(error)
        return JSONResponse({**head, "choices": [_choice(tokens, finish, completion.logprobs, 0)],
                             "usage": _usage(created, generated)})

    async def _create(self, completion: Completion, context: HttpContext) -> pb.CreateSessionResponse:
        """The session with the prompt read; an error about the prompt names `prompt`, the field the caller gave."""
        try:
            return await self._servicer.CreateSession(completion.create, context)
        except InvalidArgument as error:
            if error.field in ("prompt_text", "prompt_token_ids"):
                raise InvalidArgument("prompt", error.description) from None
            raise

    async def _generate(self, completion: Completion, context: HttpContext) -> tuple[list, str, int]:
        """The tokens to answer (stop string left out), the finish reason, and how many were generated."""
        out: list[pb.GenerateResponse] = []
        stops, finish, generated = StopsLeftOut(completion.generate.stop), "length", 0

        async def write(token: pb.GenerateResponse) -> None:
            nonlocal finish, generated
            generated += 1
            out.extend(stops.push(token))
            finish = FINISH.get(token.finish_reason, finish)

        await self._servicer.Generate(completion.generate, HttpContext(context.peer_identities(), write))
        return out, finish, generated

    async def _chunks(self, completion: Completion, context: HttpContext, head: dict, created: pb.CreateSessionResponse,
                      send: sse.Send) -> None:
        stops, sent, generated = StopsLeftOut(completion.generate.stop), 0, 0

        async def write(token: pb.GenerateResponse) -> None:
            nonlocal sent, generated
            generated += 1
            tokens = stops.push(token)
            finish = FINISH.get(token.finish_reason)
            if tokens or finish:
                await send({**head, "choices": [_choice(tokens, finish, completion.logprobs, sent)]})
                sent += sum(len(t.text) for t in tokens)

        try:
            await self._servicer.Generate(completion.generate, HttpContext(context.peer_identities(), write))
        finally:
            await self._close(completion, context)
        if completion.usage_in_stream:
            await send({**head, "choices": [], "usage": _usage(created, generated)})

    async def _close(self, completion: Completion, context: HttpContext) -> None:
        await self._servicer.CloseSession(pb.CloseSessionRequest(session_id=completion.generate.session_id), context)


def _usage(created: pb.CreateSessionResponse, completion: int) -> dict:
    """OpenAI's usage, and rnnserve's count of the prompt's characters read as the unknown token (docs/INPUT.md)."""
    prompt = created.session.position
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "unknown_characters": created.unknown_characters}


_NULLABLE_INT = {"type": "integer", "nullable": True}
OPENAPI_PATHS = {"/v1/completions": {"post": {
    "operationId": "Completions", "summary": "OpenAI-style text completion of the default (or a named) model",
    "description": __doc__,
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": False, "required": ["prompt"],
        "properties": {
            "model": {"type": "string"},
            "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                                 {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}]},
            "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
            "temperature": {"type": "number", "minimum": 0, "nullable": True},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
            "seed": {"type": "integer", "minimum": 0, "nullable": True},
            "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}],
                     "nullable": True},
            "stream": {"type": "boolean", "nullable": True},
            "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                               "nullable": True},
            "logprobs": {**_NULLABLE_INT, "description": "0 or null only"},
            "user": {"type": "string"},
            "n": {**_NULLABLE_INT, "description": "1 only"},
            "best_of": {**_NULLABLE_INT, "description": "1 only"},
            "echo": {"type": "boolean", "description": "false only"},
            "suffix": {"type": "string", "nullable": True, "description": "null only"},
            "presence_penalty": {"type": "number", "description": "0 only"},
            "frequency_penalty": {"type": "number", "description": "0 only"},
            "logit_bias": {"type": "object", "nullable": True, "description": "empty or null only"},
        }}}}},
    "responses": {
        "200": {"description": "the completion, or its chunks as server-sent events ending `data: [DONE]`",
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                    "properties": {"object": {"type": "string", "enum": ["text_completion"]},
                                   "choices": {"type": "array", "items": {
                                       "type": "object", "required": ["text", "index", "finish_reason"]}}}}},
                    "text/event-stream": {"schema": EVENT}}},
        "default": {"description": "an error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
    "security": [{"bearer": []}, {}],
}}}
