"""Unary calls as data, built once for both clients: the RPC, its request, whether a retry is harmless,
and what its answer becomes.

`Client._call` and `AsyncClient._call` only send a `Call` (blocking or awaited) and hand the answer
to `result`, so an operation's request, retry policy and answer conversion are written once; the
two clients merely name it. The calls on one session are built by `SessionHandle`, which keeps
its position; those that need no session are built here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from rnnserve.client import messages
from rnnserve.client.messages import Tokens
from rnnserve.client.types import NamedState
from rnnserve.v1 import rnnserve_pb2 as pb

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """The stub method is named, not held: the sync and asyncio clients each have their own stub."""

    rpc: str  # the Inference method's name
    request: Message
    retry_safe: bool  # repeated on UNAVAILABLE only when the server cannot apply it twice (see retry.py)
    result: Callable[[Any], T]  # the response to what the caller gets


def register_state(name: str, prompt: Tokens) -> Call[NamedState]:
    """Not retried: registering a name again replaces it, so a resent registration could undo a newer one."""
    return Call("RegisterState", messages.register_state(name, prompt), False, NamedState.from_pb)


def list_states() -> Call[list[NamedState]]:
    return Call("ListStates", pb.ListStatesRequest(), True,
                lambda response: [NamedState.from_pb(state) for state in response.states])


def delete_state(name: str) -> Call[None]:
    """Retried: deleting twice deletes once (a retry whose first try landed answers StateNotFound)."""
    return Call("DeleteState", pb.DeleteStateRequest(name=name), True, lambda response: None)
