"""The Inference servicer: protobuf in, engine calls, protobuf out. No state, no policy.

Errors raised here become statuses in `guard` (unary and server-streaming calls); Stream and
StepBatch answer a failed step in-band, through the same `errors.to_status`, and go on; its
code is reported to `on_in_band_error`, for metrics, since the call itself ends OK.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
from google.protobuf.message import Message

from rnnserve.server.core.engine import Engine, GenerateInput
from rnnserve.server.core.errors import RnnserveError, to_status
from rnnserve.server.core.generate import GeneratedToken
from rnnserve.server.core.named_states import check_name
from rnnserve.server.core.served_model import ServedModel
from rnnserve.server.faces.auth import caller
from rnnserve.server.faces.convert import Readers, RequestReader, ResponseWriter
from rnnserve.server.faces.replies import InOrder, answer_in_order
from rnnserve.server.faces.routing import STREAM_ROUTED_BY_SESSION
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc


def deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() instant, None for none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, engine: Engine, readers: Readers, writer: ResponseWriter,
                 on_in_band_error: Callable[[int], None] | None = None, routed_by_session: bool = False):
        self._engine = engine
        self._models = engine.models
        self._operations = engine.operations
        self._readers = readers
        self._checks = readers.checks  # what a request must satisfy before its session is looked up
        self._write = writer
        self._on_in_band_error = on_in_band_error  # called with the google.rpc.Code of each in-band error
        # Whether this server's sessions move between replicas routed by their ids: the rnnserve client, told so
        # when it opens a Stream, then gives each session a stream of its own instead of sharing one.
        self._routed_by_session = routed_by_session

    def _model(self, request: Message, *, for_new_sessions: bool = True) -> ServedModel:
        """The model version a request names in its `model` and `model_version` fields."""
        name, version = RequestReader.model_of(request)
        return self._models.get(name, version) if for_new_sessions else self._models.find(name, version)

    async def _reader_of(self, session_id: str, owner: str) -> RequestReader:
        """The reader of the model the session runs: its vocabulary is what the request's ids and top_k mean."""
        return self._readers.of(await self._engine.model_of(session_id, owner))

    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.CreateSessionResponse:
        model = self._model(request)
        create = self._readers.of(model).create(request)
        created = await self._engine.create_session(caller(context), model, create)
        response = pb.CreateSessionResponse(session=self._write.session(created.session),
                                            cached_prompt_tokens=created.cached_tokens)
        if created.answer is not None:
            self._write.prediction(created.answer.prediction, response.prediction)
            response.unknown_characters = create.prompt.unknown_characters
        return response

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:
        session = await self._engine.find_session(RequestReader.session_id(request.session_id), caller(context))
        return self._write.session(session)

    async def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.CloseSessionResponse:
        position = await self._engine.close_session(RequestReader.session_id(request.session_id), caller(context))
        return pb.CloseSessionResponse(position=position)

    async def Step(self, request: pb.StepRequest, context) -> pb.StepResponse:
        answer = await self._submit(request, caller(context), deadline(context))
        return self._write.step(request, answer)

    async def Stream(self, requests, context) -> None:
        owner = caller(context)
        if self._routed_by_session:
            await context.send_initial_metadata(STREAM_ROUTED_BY_SESSION)
        await answer_in_order(requests, lambda request: self._submit_in_band(request, owner),
                              lambda replies: self._write_in_order(replies, owner, context))

    async def StepBatch(self, request: pb.StepBatchRequest, context) -> pb.StepBatchResponse:
        owner, until = caller(context), deadline(context)
        self._readers.step_batch(request, self._models.all())
        replies = [self._submit_in_band(step, owner, until) for step in request.steps]
        try:
            for reply in replies:  # steps run in one model call settle together: one wake-up for them, not one each
                if not reply.done():
                    await asyncio.wait((reply,))
        finally:
            for reply in replies:
                reply.cancel()  # withdraws what has not been applied when the call is cancelled
        response = pb.StepBatchResponse()
        for step, reply in zip(request.steps, replies):
            self._reply(step, reply, owner, response.results.add())
        return response

    async def Generate(self, request: pb.GenerateRequest, context) -> None:
        unknown = 0  # the request's, told on the first token only

        def read(model: ServedModel) -> GenerateInput:
            nonlocal unknown
            generate = self._readers.of(model).generate(request)
            unknown = generate.unknown_characters
            return generate

        async def send(token: GeneratedToken) -> None:
            nonlocal unknown
            response = self._write.generated(token)
            response.unknown_characters, unknown = unknown, 0
            await context.write(response)

        self.check_generate(request)
        await self._engine.generate(RequestReader.session_id(request.session_id), caller(context), read, send)

    def check_generate(self, request: pb.GenerateRequest) -> None:
        """Generate's checks that need no session (the server's limits), for a face that opens the session itself
        (/v1/completions): a mistake is then refused before a session is opened and its prompt read, and answered
        INVALID_ARGUMENT even when the session table is full."""
        self._checks.generate_options(request)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        owner = caller(context)
        return pb.ListModelsResponse(models=[self._write.model(model, self._models, owner)
                                             for model in self._models.all()])

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.Model:
        name = RequestReader.model_name(request.name, "model")
        version = RequestReader.model_name(request.version, "model_version")
        return self._write.model(self._models.find(name, version), self._models, caller(context))

    # Session operations --------------------------------------------------------------------------

    async def ForkSession(self, request: pb.ForkSessionRequest, context) -> pb.ForkSessionResponse:
        count, ttl, expected = self._checks.fork(request)
        forks = await self._operations.fork(RequestReader.session_id(request.session_id), caller(context), count, ttl,
                                            expected)
        return pb.ForkSessionResponse(sessions=[self._write.session(fork) for fork in forks])

    async def ResetSession(self, request: pb.ResetSessionRequest, context) -> pb.Session:
        session = await self._operations.reset(RequestReader.session_id(request.session_id), caller(context),
                                               RequestReader.expected_position(request))
        return self._write.session(session)

    async def RewindSession(self, request: pb.RewindSessionRequest, context) -> pb.RewindSessionResponse:
        session_id, owner = RequestReader.session_id(request.session_id), caller(context)
        self._checks.rewind_count(request)
        tokens, expected, top_k, temperature = (await self._reader_of(session_id, owner)).rewind(request)
        session, prediction = await self._operations.rewind(session_id, owner, tokens, expected, top_k, temperature)
        response = pb.RewindSessionResponse()
        self._write.moved(session, prediction, response)
        return response

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        session_id, owner = RequestReader.session_id(request.session_id), caller(context)
        self._checks.continuation_count(request)
        reader = await self._reader_of(session_id, owner)
        continuations = reader.score(request)
        position, scored = await self._operations.score(session_id, owner, continuations,
                                                        RequestReader.expected_position(request))
        unknown = [reader.unknown(candidate.tokens, continuation.text)
                   for candidate, continuation in zip(scored, request.continuations)]
        return self._write.scores(position, scored, unknown)

    async def Peek(self, request: pb.StepRequest, context) -> pb.StepResponse:
        session_id, owner = RequestReader.session_id(request.session_id), caller(context)
        step = (await self._reader_of(session_id, owner)).step(request)
        answer = await self._operations.peek(session_id, owner, step.tokens, step.top_k, step.temperature,
                                             step.expected_position)
        return self._write.step(request, answer._replace(unknown_characters=step.unknown_characters))

    async def ExportSession(self, request: pb.ExportSessionRequest, context) -> pb.ExportSessionResponse:
        session, blob = await self._operations.export(RequestReader.session_id(request.session_id), caller(context),
                                                      RequestReader.expected_position(request))
        return pb.ExportSessionResponse(state=blob, session=self._write.session(session))

    async def ImportSession(self, request: pb.ImportSessionRequest, context) -> pb.ImportSessionResponse:
        model, portable = self._operations.decode(RequestReader.exported_state(request))
        ttl, top_k, temperature = self._readers.of(model).import_(request)
        session, prediction = self._operations.import_(caller(context), model, portable,
                                                       ttl or self._engine.settings.default_ttl_seconds, top_k,
                                                       temperature)
        response = pb.ImportSessionResponse()
        self._write.moved(session, prediction, response)
        return response

    async def RegisterState(self, request: pb.RegisterStateRequest, context) -> pb.NamedState:
        model = self._model(request)
        name, tokens, unknown = self._readers.of(model).register_state(request)
        registered = self._write.named_state(
            await self._operations.register_state(model, caller(context), name, tokens), model)
        registered.unknown_characters = unknown
        return registered

    async def ListStates(self, request: pb.ListStatesRequest, context) -> pb.ListStatesResponse:
        model = self._model(request, for_new_sessions=False)
        states = model.states.all(caller(context))
        return pb.ListStatesResponse(states=[self._write.named_state(state, model) for state in states])

    async def DeleteState(self, request: pb.DeleteStateRequest, context) -> pb.DeleteStateResponse:
        model = self._model(request, for_new_sessions=False)
        model.states.delete(caller(context), check_name(request.name))
        return pb.DeleteStateResponse()

    # Steps -------------------------------------------------------------------------------------

    def _submit(self, request: pb.StepRequest, owner: str, until: float | None = None) -> asyncio.Future:
        return self._engine.step(RequestReader.session_id(request.session_id), owner,
                                 lambda model: self._readers.of(model).step(request), until)

    def _submit_in_band(self, request: pb.StepRequest, owner: str, until: float | None = None) -> asyncio.Future:
        """Like `_submit`, but a request refused at once is a failed future too, settled in its turn."""
        try:
            return self._submit(request, owner, until)
        except RnnserveError as error:
            return self._engine.refused_step(request.session_id, owner, error)

    def _reply(self, request: pb.StepRequest, reply: asyncio.Future, owner: str,
               into: pb.StepResponse | None = None) -> pb.StepResponse:
        """The response to a settled step, its answer or its error in-band, written into `into` if given."""
        error = reply.exception()
        if error is None:
            return self._write.step(request, reply.result(), into)
        status = to_status(error)
        if self._on_in_band_error is not None:
            self._on_in_band_error(status.code)
        position = error.session_position if isinstance(error, RnnserveError) else None
        if position is None:
            position = self._position(request.session_id, owner)
        return self._write.step_error(request, status, position, into)

    def _position(self, session_id: str, owner: str) -> int:
        """Where `owner`'s session stands now, for the answer to a step whose error does not say (no such session,
        or an error of the transport): 0 when it has no such session."""
        return self._engine.position_held(session_id, owner)

    async def _write_in_order(self, replies: InOrder[pb.StepRequest], owner: str, context) -> None:
        async for request, reply in replies:
            await context.write(self._reply(request, reply, owner))
