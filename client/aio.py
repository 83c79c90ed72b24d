"""The asyncio client: the same calls as `rnnserve.client.sync`, awaited, for services on an event loop.

    async with AsyncClient("127.0.0.1:50051") as client:
        async with client.session("To be, or not") as session:
            print((await session.step(" to")).best.text)
            async for token in session.generate(40, temperature=0.8, seed=1):
                print(token.text, end="")

Everything but awaiting (requests, answers, positions, errors, retry policy) is shared with the
sync client, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from rnnserve.client import calls, messages
from rnnserve.client.calls import Call
from rnnserve.client.connection import INFERENCE, ClientBase
from rnnserve.client.errors import RnnserveError, SessionNotFound, error_from_rpc, raising_rnnserve_errors
from rnnserve.client.messages import DEFAULT_TOP_K, Tokens
from rnnserve.client.shared_streams import AsyncStepStreams
from rnnserve.client.session import SessionHandle, Target, answer, batch_request, batch_results, is_retry_safe, \
    step_request
from rnnserve.client.types import ContinuationScore, GeneratedToken, ModelInfo, NamedState, Prediction, SessionInfo
from rnnserve.v1 import rnnserve_pb2 as pb

T = TypeVar("T")


class AsyncClient(ClientBase):
    """A connection to an rnnserve server; use `async with` to close the channel."""

    _aio = True
    _step_streams = AsyncStepStreams

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
        await self._channel.close()

    @property
    def admin(self) -> AsyncAdmin:
        """As `Client.admin`: the Admin calls, awaited, sent with `admin_token`."""
        return AsyncAdmin(self)

    async def _unary(self, method: Callable, request: Any, timeout: float | None, *, retry_safe: bool,
                     service: str = INFERENCE) -> Any:
        """One call, retried on UNAVAILABLE with backoff when `retry_safe`; failures raise RnnserveError."""
        for attempt in itertools.count():
            try:
                return await method(request, **self._connection.call_options(timeout, request, service))
            except grpc.RpcError as error:
                await asyncio.sleep(self._connection.retry.backoff(attempt, error_from_rpc(error), retry_safe))

    async def _step(self, request: pb.StepRequest, timeout: float | None) -> pb.StepResponse:
        """As `Client._step`."""
        if self._steps is None:
            return await self._unary(self._inference.Step, request, timeout, retry_safe=is_retry_safe(request))
        return await self._steps.step(request, timeout, is_retry_safe(request))

    async def _call(self, call: Call[T], timeout: float | None) -> T:
        response = await self._unary(getattr(self._stubs[call.service], call.rpc), call.request, timeout,
                                     retry_safe=call.retry_safe, service=call.service)
        return call.result(response)

    def session(self, prompt: Tokens | None = None, *, ttl: int | None = None, model: str | None = None,
                model_version: str | int | None = None, top_k: int = DEFAULT_TOP_K, temperature: float | None = None,
                initial_state: str | None = None, timeout: float | None = None) -> OpeningSession:
        """As `Client.session`: `session = await client.session()`, or `async with client.session() as session`."""
        request = messages.create_session(model, model_version, prompt, ttl, top_k, temperature, initial_state)
        return OpeningSession(self._open_session(request, timeout))

    async def _open_session(self, request: pb.CreateSessionRequest, timeout: float | None) -> AsyncSession:
        created = await self._unary(self._inference.CreateSession, request, timeout, retry_safe=False)
        return AsyncSession._created(self, created)

    async def resume(self, session_id: str, *, timeout: float | None = None) -> AsyncSession:
        """As `Client.resume`: a session opened earlier, at the position the server reports."""
        request = pb.GetSessionRequest(session_id=session_id)
        return AsyncSession(self, await self._unary(self._inference.GetSession, request, timeout, retry_safe=True))

    async def import_session(self, state: bytes, *, ttl: int | None = None, top_k: int = DEFAULT_TOP_K,
                             temperature: float | None = None, timeout: float | None = None) -> AsyncSession:
        """As `Client.import_session`: not retried."""
        return await self._call(AsyncSession._import(self, state, ttl, top_k, temperature), timeout)

    async def register_state(self, name: str, prompt: Tokens, *, model: str | None = None,
                             model_version: str | int | None = None, timeout: float | None = None) -> NamedState:
        """As `Client.register_state`: not retried."""
        return await self._call(calls.register_state(name, prompt, model, model_version), timeout)

    async def states(self, *, model: str | None = None, model_version: str | int | None = None,
                     timeout: float | None = None) -> list[NamedState]:
        return await self._call(calls.list_states(model, model_version), timeout)

    async def delete_state(self, name: str, *, model: str | None = None, model_version: str | int | None = None,
                           timeout: float | None = None) -> None:
        await self._call(calls.delete_state(name, model, model_version), timeout)

    def stream(self, *, timeout: float | None = None) -> AsyncStepStream:
        """As `Client.stream`: one Stream call for the steps of any number of sessions."""
        return AsyncStepStream(self, timeout)

    async def step_batch(self, steps: Sequence[tuple[Target, Tokens]], *, top_k: int = DEFAULT_TOP_K,
                         temperature: float | None = None,
                         timeout: float | None = None) -> list[Prediction | RnnserveError]:
        """As `Client.step_batch`: a failed step's error is returned at its index."""
        request = batch_request(steps, top_k, temperature)
        response = await self._unary(self._inference.StepBatch, request, timeout,
                                     retry_safe=all(map(is_retry_safe, request.steps)))
        return batch_results([target for target, _ in steps], response)

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """As `Client.models`: every loaded version."""
        return await self._call(calls.list_models(), timeout)

    async def model(self, name: str = "", version: str | int | None = None, *,
                    timeout: float | None = None) -> ModelInfo:
        """As `Client.model`."""
        return await self._call(calls.get_model(name, version), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """As `Client.health`."""
        response = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout,
                                     retry_safe=True)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class AsyncAdmin:
    """As `Admin`, awaited: the same calls, the same retries."""

    def __init__(self, client: AsyncClient):
        self._client = client

    async def load_model(self, name: str, version: str | int, *, make_default: bool = False,
                         timeout: float | None = None) -> ModelInfo:
        """As `Admin.load_model`."""
        return await self._client._call(calls.load_model(name, version, make_default), timeout)

    async def unload_model(self, name: str, version: str | int, *, timeout: float | None = None) -> ModelInfo:
        """As `Admin.unload_model`."""
        return await self._client._call(calls.unload_model(name, version), timeout)

    async def set_default_model(self, name: str, version: str | int, *, server_default: bool = False,
                                timeout: float | None = None) -> ModelInfo:
        """As `Admin.set_default_model`."""
        return await self._client._call(calls.set_default_model(name, version, server_default), timeout)

    async def register_shared_state(self, name: str, prompt: Tokens, *, model: str | None = None,
                                    model_version: str | int | None = None,
                                    timeout: float | None = None) -> NamedState:
        """As `Admin.register_shared_state`: not retried."""
        return await self._client._call(calls.register_shared_state(name, prompt, model, model_version), timeout)

    async def delete_shared_state(self, name: str, *, model: str | None = None,
                                  model_version: str | int | None = None, timeout: float | None = None) -> None:
        """As `Admin.delete_shared_state`."""
        await self._client._call(calls.delete_shared_state(name, model, model_version), timeout)


class AsyncSession(SessionHandle):
    """As `Session`, awaited; closed on leaving `async with`."""

    _client: AsyncClient

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def step(self, tokens: Tokens, *, top_k: int = DEFAULT_TOP_K, temperature: float | None = None,
                   timeout: float | None = None) -> Prediction:
        return self._advance(await self._client._step(self._step_request(tokens, top_k, temperature), timeout))

    async def generate(self, max_tokens: int, *, tokens: Tokens | None = None, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                       stop: Sequence[str] = (), timeout: float | None = None) -> AsyncIterator[GeneratedToken]:
        """As `Session.generate`, an async iterator; leaving `async for` early cancels the generation."""
        request = self._generate_request(tokens, max_tokens, temperature, top_k, top_p, seed, stop)
        call = self._client._inference.Generate(request, **self._client._connection.call_options(timeout, request))
        with self._generation(call):
            async for response in call:
                yield self._generated(response)

    async def info(self, *, timeout: float | None = None) -> SessionInfo:
        request = pb.GetSessionRequest(session_id=self.id)
        return SessionInfo.from_pb(await self._client._unary(self._client._inference.GetSession, request, timeout,
                                                             retry_safe=True))

    async def fork(self, count: int | None = None, *, ttl: int | None = None,
                   timeout: float | None = None) -> AsyncSession | list[AsyncSession]:
        """As `Session.fork`: one session, or a list of `count`; never retried."""
        return await self._client._call(self._fork(count, ttl), timeout)

    async def reset(self, *, timeout: float | None = None) -> SessionInfo:
        """As `Session.reset`."""
        return await self._client._call(self._reset(), timeout)

    async def rewind(self, tokens: int, *, top_k: int = DEFAULT_TOP_K, temperature: float | None = None,
                     timeout: float | None = None) -> Prediction | None:
        """As `Session.rewind`: the prediction at the new position, None at position 0 of zeros."""
        return await self._client._call(self._rewind(tokens, top_k, temperature), timeout)

    async def score(self, *continuations: Tokens, timeout: float | None = None) -> list[ContinuationScore]:
        """As `Session.score`: the session does not advance."""
        return await self._client._call(self._score(continuations), timeout)

    async def peek(self, tokens: Tokens, *, top_k: int = DEFAULT_TOP_K, temperature: float | None = None,
                   timeout: float | None = None) -> Prediction:
        """As `Session.peek`: the session does not advance."""
        return await self._client._call(self._peek(tokens, top_k, temperature), timeout)

    async def export(self, *, timeout: float | None = None) -> bytes:
        """As `Session.export`."""
        return await self._client._call(self._export(), timeout)

    async def close(self, *, timeout: float | None = None) -> None:
        """As `Session.close`: a session that is already gone counts as closed."""
        if self._client._steps is not None:
            self._client._steps.forget(self.id)
        with contextlib.suppress(SessionNotFound):
            await self._client._unary(self._client._inference.CloseSession,
                                      pb.CloseSessionRequest(session_id=self.id), timeout, retry_safe=True)


class OpeningSession:
    """A session being opened: await it for the session, or enter it to have it closed on exit."""

    def __init__(self, opening: Coroutine[Any, Any, AsyncSession]):
        self._opening = opening

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._opening.__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._opening
        return self._session

    async def __aexit__(self, *exc_info: object) -> None:
        await self._session.close()


class AsyncStepStream:
    """As `StepStream`, awaited: steps of several sessions over one Stream call, answered in order."""

    def __init__(self, client: AsyncClient, timeout: float | None):
        self._call = client._inference.Stream(timeout=timeout, metadata=client._connection.metadata)

    async def __aenter__(self) -> AsyncStepStream:
        return self

    async def __aexit__(self, exc_type: type | None, *exc_info: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            self._call.cancel()

    async def step(self, target: Target, tokens: Tokens, *, top_k: int = DEFAULT_TOP_K,
                   temperature: float | None = None) -> Prediction:
        with raising_rnnserve_errors():
            await self._call.write(step_request(target, tokens, top_k, temperature))
            response = await self._call.read()
        return answer(target, response)

    async def close(self) -> None:
        """Stop sending and wait for the server to end the stream."""
        with raising_rnnserve_errors():
            await self._call.done_writing()
            await self._call.read()
