"""Unary calls as data, built once for both clients: the service and RPC, its request, whether a retry is
harmless, and what its answer becomes.

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
from rnnserve.client.connection import ADMIN, INFERENCE
from rnnserve.client.messages import Tokens
from rnnserve.client.types import ModelInfo, NamedState
from rnnserve.v1 import rnnserve_pb2 as pb

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """The stub method is named, not held: the sync and asyncio clients each have their own stub."""

    rpc: str  # the method's name
    request: Message
    retry_safe: bool  # repeated on UNAVAILABLE only when the server cannot apply it twice (see retry.py)
    result: Callable[[Any], T]  # the response to what the caller gets
    service: str = INFERENCE  # whose method: INFERENCE, or ADMIN (sent with the admin token)


def register_state(name: str, prompt: Tokens, model: str | None, model_version: str | int | None) -> Call[NamedState]:
    """Not retried: registering a name again replaces it, so a resent registration could undo a newer one."""
    return Call("RegisterState", messages.register_state(name, prompt, model, model_version), False,
                NamedState.from_pb)


def list_states(model: str | None, model_version: str | int | None) -> Call[list[NamedState]]:
    request = pb.ListStatesRequest(model=model, model_version=messages.version(model_version))
    return Call("ListStates", request, True, lambda response: [NamedState.from_pb(state) for state in response.states])


def delete_state(name: str, model: str | None, model_version: str | int | None, rpc: str = "DeleteState",
                 service: str = INFERENCE) -> Call[None]:
    """Retried: deleting twice deletes once (a retry whose first try landed answers StateNotFound)."""
    request = pb.DeleteStateRequest(name=name, model=model, model_version=messages.version(model_version))
    return Call(rpc, request, True, lambda response: None, service)


def list_models() -> Call[list[ModelInfo]]:
    return Call("ListModels", pb.ListModelsRequest(), True,
                lambda response: [ModelInfo.from_pb(model) for model in response.models])


def get_model(name: str, version: str | int | None) -> Call[ModelInfo]:
    return Call("GetModel", pb.GetModelRequest(name=name, version=messages.version(version)), True, ModelInfo.from_pb)


# Admin calls. Each names exactly the version it changes, so a resend cannot change anything else; whether it
# may be resent after a lost answer is decided per call below.

def load_model(name: str, version: str | int, make_default: bool) -> Call[ModelInfo]:
    """Retried: the server answers LoadModel of a version it has loaded with that version (made the default
    again if asked), so a resend whose first try landed loads nothing twice."""
    request = pb.LoadModelRequest(name=name, version=messages.version(version), make_default=make_default)
    return Call("LoadModel", request, True, ModelInfo.from_pb, ADMIN)


def unload_model(name: str, version: str | int) -> Call[ModelInfo]:
    """Retried: a version retires once, and a resend while it retires answers it again. But a version without
    sessions unloads at once, so a resend whose first try landed raises ModelNotFound, as a resent
    `delete_state` raises StateNotFound: nothing else is ever unloaded, and the version is gone as asked."""
    request = pb.UnloadModelRequest(name=name, version=messages.version(version))
    return Call("UnloadModel", request, True, ModelInfo.from_pb, ADMIN)


def set_default_model(name: str, version: str | int, server_default: bool) -> Call[ModelInfo]:
    """Retried: setting the same default twice leaves it as once."""
    request = pb.SetDefaultModelRequest(name=name, version=messages.version(version), server_default=server_default)
    return Call("SetDefaultModel", request, True, ModelInfo.from_pb, ADMIN)


def register_shared_state(name: str, prompt: Tokens, model: str | None,
                          model_version: str | int | None) -> Call[NamedState]:
    """Not retried, as `register_state` is not: a resent registration could undo a newer one."""
    return Call("RegisterSharedState", messages.register_state(name, prompt, model, model_version), False,
                NamedState.from_pb, ADMIN)


def delete_shared_state(name: str, model: str | None, model_version: str | int | None) -> Call[None]:
    """Retried, as `delete_state` is."""
    return delete_state(name, model, model_version, "DeleteSharedState", ADMIN)
