"""Request messages from Python arguments, shared by the sync and asyncio clients.

Python's `None` means "the server's default" here; it becomes the proto's unset or zero value,
so a default is decided in one place only, on the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from rnnserve.v1 import rnnserve_pb2 as pb

# Tokens to feed: text (encoded by the server with the model's vocabulary) or token ids.
Tokens = Union[str, Sequence[int]]

DEFAULT_TOP_K = 5


def _feed(tokens: Tokens | None) -> dict:
    if isinstance(tokens, str):
        return {"text": tokens}
    return {"token_ids": [] if tokens is None else list(tokens)}


def create_session(model: str | None, prompt: Tokens | None, ttl: int | None, top_k: int,
                   temperature: float | None) -> pb.CreateSessionRequest:
    feed = _feed(prompt)
    return pb.CreateSessionRequest(model=model, prompt_text=feed.get("text"), prompt_token_ids=feed.get("token_ids"),
                                   ttl_seconds=ttl, top_k=top_k, temperature=temperature)


def step(session_id: str, tokens: Tokens, top_k: int, temperature: float | None,
         expected_position: int | None) -> pb.StepRequest:
    return pb.StepRequest(session_id=session_id, **_feed(tokens), top_k=top_k, temperature=temperature,
                          expected_position=expected_position)


def generate(session_id: str, tokens: Tokens | None, max_tokens: int, temperature: float, top_k: int | None,
             top_p: float | None, seed: int | None, stop: Sequence[str],
             expected_position: int | None) -> pb.GenerateRequest:
    return pb.GenerateRequest(session_id=session_id, **_feed(tokens), max_tokens=max_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, stop=list(stop),
                              expected_position=expected_position)
