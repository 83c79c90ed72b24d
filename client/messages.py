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


def _prompt(prompt: Tokens | None) -> dict:
    """A prompt's fields, named as CreateSessionRequest and RegisterStateRequest name them."""
    feed = _feed(prompt)
    return {"prompt_text": feed.get("text"), "prompt_token_ids": feed.get("token_ids")}


def create_session(model: str | None, prompt: Tokens | None, ttl: int | None, top_k: int,
                   temperature: float | None, initial_state: str | None) -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(model=model, **_prompt(prompt), ttl_seconds=ttl, top_k=top_k,
                                   temperature=temperature, initial_state=initial_state)


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


def fork(session_id: str, count: int, ttl: int | None, expected_position: int | None) -> pb.ForkSessionRequest:
    if count < 1:  # the wire reads 0 as 1: refused here, so that fork(0) cannot quietly make a session
        raise ValueError(f"count must be at least 1, got {count}")
    return pb.ForkSessionRequest(session_id=session_id, count=count, ttl_seconds=ttl,
                                 expected_position=expected_position)


def rewind(session_id: str, tokens: int, top_k: int, temperature: float | None,
           expected_position: int | None) -> pb.RewindSessionRequest:
    return pb.RewindSessionRequest(session_id=session_id, tokens=tokens, top_k=top_k, temperature=temperature,
                                   expected_position=expected_position)


def score(session_id: str, continuations: Sequence[Tokens], expected_position: int | None) -> pb.ScoreRequest:
    return pb.ScoreRequest(session_id=session_id, continuations=[pb.Continuation(**_feed(c)) for c in continuations],
                           expected_position=expected_position)


def import_session(state: bytes, ttl: int | None, top_k: int, temperature: float | None) -> pb.ImportSessionRequest:
    return pb.ImportSessionRequest(state=state, ttl_seconds=ttl, top_k=top_k, temperature=temperature)


def register_state(name: str, prompt: Tokens) -> pb.RegisterStateRequest:
    return pb.RegisterStateRequest(name=name, **_prompt(prompt))
