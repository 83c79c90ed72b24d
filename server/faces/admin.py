"""The Admin service: which model versions serve, changed while sessions run, and the named states for everyone.

Operators' calls, not callers of the model: with tokens on, only the admin tokens open it
(`auth.interceptors`). Each change is logged with who made it, since it changes what every
later session gets.
"""

from __future__ import annotations

import logging

from google.protobuf.message import Message

from rnnserve.server.core.engine import Engine
from rnnserve.server.core.errors import InvalidArgument
from rnnserve.server.core.model_loading import ModelLoader
from rnnserve.server.core.named_states import check_name
from rnnserve.server.faces.auth import caller
from rnnserve.server.faces.convert import Readers, RequestReader, ResponseWriter
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def named_version(request: Message) -> tuple[str, str]:
    """The request's model name and version, both required: an operator's call names exactly what it changes."""
    for field in ("name", "version"):
        if not getattr(request, field):
            raise InvalidArgument(field, "required: Admin calls name the model and the version they change")
    return RequestReader.model_name(request.name), RequestReader.model_name(request.version, "version")


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, engine: Engine, loader: ModelLoader, readers: Readers, writer: ResponseWriter):
        self._engine = engine
        self._loader = loader
        self._readers = readers
        self._write = writer

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.Model:
        name, version = named_version(request)
        model = await self._loader.load(name, version, request.make_default)
        log.info("%s loaded model %s%s", _who(context), model.describe(), " as the default" if request.make_default else "")
        return self._write.model(model, self._engine.models)

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.Model:
        name, version = named_version(request)
        model = self._engine.retire_model(name, version)
        log.info("%s unloaded model %s", _who(context), model.describe())
        return self._write.model(model, self._engine.models)

    async def SetDefaultModel(self, request: pb.SetDefaultModelRequest, context) -> pb.Model:
        name, version = named_version(request)
        model = self._engine.models.set_default(name, version, request.server_default)
        log.info("%s made model %s the default for new sessions%s", _who(context), model.describe(),
                 " of the server" if request.server_default else f" of {name}")
        return self._write.model(model, self._engine.models)

    async def RegisterSharedState(self, request: pb.RegisterStateRequest, context) -> pb.NamedState:
        model = self._engine.models.get(*RequestReader.model_of(request))
        name, tokens, unknown = self._readers.of(model).register_state(request)
        state = await self._engine.operations.register_shared_state(model, name, tokens)
        log.info("%s registered the shared state %r of model %s", _who(context), name, model.describe())
        registered = self._write.named_state(state, model)
        registered.unknown_characters = unknown
        return registered

    async def DeleteSharedState(self, request: pb.DeleteStateRequest, context) -> pb.DeleteStateResponse:
        model = self._engine.models.find(*RequestReader.model_of(request))
        model.states.delete_shared(check_name(request.name))
        log.info("%s deleted the shared state %r of model %s", _who(context), request.name, model.describe())
        return pb.DeleteStateResponse()


def _who(context) -> str:
    return f"admin {caller(context) or 'anonymous'}"
