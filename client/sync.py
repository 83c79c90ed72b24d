"""The synchronous client: blocking calls, for scripts, notebooks and threaded services.

    with Client("127.0.0.1:50051") as client, client.session("To be, or not") as session:
        print(session.prediction.best.text)
        print(session.step(" to").candidates)
        print("".join(token.text for token in session.generate(40, temperature=0.8, seed=1)))
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from rnnserve.client import calls, messages
from rnnserve.client.calls import Call
from rnnserve.client.connection import INFERENCE, ClientBase
from rnnserve.client.errors import RnnserveError, SessionNotFound, error_from_rpc, raising_rnnserve_errors
from rnnserve.client.messages import DEFAULT_TOP_K, Tokens
from rnnserve.client.shared_streams import StepStreams
from rnnserve.client.session import SessionHandle, Target, answer, batch_request, batch_results, is_retry_safe, \
    step_request
from rnnserve.client.types import ContinuationScore, GeneratedToken, ModelInfo, NamedState, Prediction, SessionInfo
from rnnserve.v1 import rnnserve_pb2 as pb

T = TypeVar("T")


class Client(ClientBase):
    """A connection to an rnnserve server; use it as a context manager to close the channel."""

    _step_streams = StepStreams

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
        self._channel.close()

    @property
    def admin(self) -> Admin:
        """The Admin calls (which model versions serve), sent with `admin_token`."""
        return Admin(self)

    def _unary(self, method: Callable, request: Any, timeout: float | None, *, retry_safe: bool,
               service: str = INFERENCE) -> Any:
        """One call, retried on UNAVAILABLE with backoff when `retry_safe`; failures raise RnnserveError."""
        for attempt in itertools.count():
            try:
                return method(request, **self._connection.call_options(timeout, request, service))
            except grpc.RpcError as error:
                time.sleep(self._connection.retry.backoff(attempt, error_from_rpc(error), retry_safe))

    def _step(self, request: pb.StepRequest, timeout: float | None) -> pb.StepResponse:
        """A session's step, over the shared streams unless the client was made `unary`."""
        if self._steps is None:
            return self._unary(self._inference.Step, request, timeout, retry_safe=is_retry_safe(request))
        return self._steps.step(request, timeout, is_retry_safe(request))

    def _call(self, call: Call[T], timeout: float | None) -> T:
        response = self._unary(getattr(self._stubs[call.service], call.rpc), call.request, timeout,
                               retry_safe=call.retry_safe, service=call.service)
        return call.result(response)

    def session(self, prompt: Tokens | None = None, *, ttl: int | None = None, model: str | None = None,
                model_version: str | int | None = None, top_k: int = DEFAULT_TOP_K, temperature: float | None = None,
                initial_state: str | None = None, timeout: float | None = None) -> Session:
        """Open a session, feeding `prompt` (text or token ids) if given; close it with `with` or `close()`.

        Not retried: a lost answer would leave an unused session behind until its ttl (seconds)
        runs out. `model` and `model_version` choose what it runs (None: the server's default
        model, that model's default version); it runs that version for its whole life
        (`session.model_version`). `top_k` and `temperature` shape `session.prediction`, the one
        after the prompt. `initial_state` starts it from a named state (`states()`) instead of
        zeros, still at position 0. `session.cached_prompt_tokens` tells how much of the prompt
        the server did not have to read, having its state cached.
        """
        request = messages.create_session(model, model_version, prompt, ttl, top_k, temperature, initial_state)
        created = self._unary(self._inference.CreateSession, request, timeout, retry_safe=False)
        return Session._created(self, created)

    def import_session(self, state: bytes, *, ttl: int | None = None, top_k: int = DEFAULT_TOP_K,
                       temperature: float | None = None, timeout: float | None = None) -> Session:
        """A new session continuing exactly where an exported one (`Session.export`) was, here or on a peer.

        Not retried, as `session` is not. `session.prediction` is the one the exported session
        held. A blob of another model or format version raises IncompatibleState; a damaged one
        InvalidArgument.
        """
        return self._call(Session._import(self, state, ttl, top_k, temperature), timeout)

    def register_state(self, name: str, prompt: Tokens, *, model: str | None = None,
                       model_version: str | int | None = None, timeout: float | None = None) -> NamedState:
        """Name the state after `prompt`: sessions can start from it, and prompts starting with it skip reading it.

        The state is this client's identity's alone: no other identity lists, uses or deletes it
        (`admin.register_shared_state` registers one for everyone). A name shared with everyone
        raises StateIsShipped. Each model version has its own named states (a state means something only to its graph):
        `model` and `model_version` choose whose, None for the defaults, as in `session`. Not
        retried: registering a name again replaces it, so a resent registration could undo a newer one.
        """
        return self._call(calls.register_state(name, prompt, model, model_version), timeout)

    def states(self, *, model: str | None = None, model_version: str | int | None = None,
               timeout: float | None = None) -> list[NamedState]:
        """The named states of a model version (None: the defaults) this client may use, sorted by name: shipped
        ones, those shared through Admin, and its own identity's registered ones."""
        return self._call(calls.list_states(model, model_version), timeout)

    def delete_state(self, name: str, *, model: str | None = None, model_version: str | int | None = None,
                     timeout: float | None = None) -> None:
        """Forget one of this identity's registered states; sessions started from it keep their copy. Shipped and
        shared ones raise StateIsShipped."""
        self._call(calls.delete_state(name, model, model_version), timeout)

    def resume(self, session_id: str, *, timeout: float | None = None) -> Session:
        """A session opened earlier (perhaps by another process), at the position the server reports."""
        request = pb.GetSessionRequest(session_id=session_id)
        return Session(self, self._unary(self._inference.GetSession, request, timeout, retry_safe=True))

    def stream(self, *, timeout: float | None = None) -> StepStream:
        """One bidirectional stream for the steps of any number of sessions, answered in order.

        `timeout` bounds the stream's whole life; by default it has none, since a stream
        usually lives as long as the conversation it carries.
        """
        return StepStream(self, timeout)

    def step_batch(self, steps: Sequence[tuple[Target, Tokens]], *, top_k: int = DEFAULT_TOP_K,
                   temperature: float | None = None, timeout: float | None = None) -> list[Prediction | RnnserveError]:
        """One step for each (session, tokens) pair in one message; a failed step's error is returned at its index."""
        request = batch_request(steps, top_k, temperature)
        response = self._unary(self._inference.StepBatch, request, timeout,
                               retry_safe=all(map(is_retry_safe, request.steps)))
        return batch_results([target for target, _ in steps], response)

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every loaded model version, retiring ones included: the server's default model first, each model's
        versions in order."""
        return self._call(calls.list_models(), timeout)

    def model(self, name: str = "", version: str | int | None = None, *, timeout: float | None = None) -> ModelInfo:
        """One loaded version: `name` ("" for the server's default model) at `version` (None: its default)."""
        return self._call(calls.get_model(name, version), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard gRPC health status ("SERVING", "NOT_SERVING", ...); "" asks about the whole server."""
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout,
                               retry_safe=True)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class Admin:
    """Operator calls (the Admin service) over the client's channel, sent with its `admin_token`.

    Each names the model and version it changes and answers that version as it now is. They
    are retried on UNAVAILABLE like the reads, since none changes anything twice (see `calls`):
    a resent `unload_model` whose first try landed may raise ModelNotFound, the version gone as asked.
    """

    def __init__(self, client: Client):
        self._client = client

    def load_model(self, name: str, version: str | int, *, make_default: bool = False,
                   timeout: float | None = None) -> ModelInfo:
        """Load `version` of `name` from the server's model repository, checked before it serves; with
        `make_default`, new sessions of `name` get it. A version loaded already is answered as it is.

        ModelRefused when the bundle fails its checks (nothing changes), ModelNotFound when the
        repository has no such version. Loading checks the graph: allow it a `timeout` of seconds.
        """
        return self._client._call(calls.load_model(name, version, make_default), timeout)

    def unload_model(self, name: str, version: str | int, *, timeout: float | None = None) -> ModelInfo:
        """Stop serving `version` of `name`: at once without sessions, else it retires (`retiring`) and unloads
        after its last session ends. A default version raises ModelIsDefault: make another the default first."""
        return self._client._call(calls.unload_model(name, version), timeout)

    def set_default_model(self, name: str, version: str | int, *, server_default: bool = False,
                          timeout: float | None = None) -> ModelInfo:
        """New sessions of `name` get `version` (and, with `server_default`, requests naming no model get
        `name`); running sessions stay where they are. A retiring version raises ModelRetiring."""
        return self._client._call(calls.set_default_model(name, version, server_default), timeout)

    def register_shared_state(self, name: str, prompt: Tokens, *, model: str | None = None,
                              model_version: str | int | None = None, timeout: float | None = None) -> NamedState:
        """Name the state after `prompt` for every caller (source "shared"): each may list it and start from it,
        none may replace or delete it. A shipped state's name raises StateIsShipped. Not retried."""
        return self._client._call(calls.register_shared_state(name, prompt, model, model_version), timeout)

    def delete_shared_state(self, name: str, *, model: str | None = None, model_version: str | int | None = None,
                            timeout: float | None = None) -> None:
        """Forget a shared state; sessions started from it keep their copy. A shipped one raises StateIsShipped."""
        self._client._call(calls.delete_shared_state(name, model, model_version), timeout)


class Session(SessionHandle):
    """A session on the server, holding its hidden state between steps; closed on leaving `with`.

    Drive one session from one thread at a time: each step expects the position the previous
    one left, so two threads stepping it at once would see PositionMismatch, not interleaved text.
    """

    _client: Client

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def step(self, tokens: Tokens, *, top_k: int = DEFAULT_TOP_K, temperature: float | None = None,
             timeout: float | None = None) -> Prediction:
        """Feed text or token ids (several are one prefill) and predict the next token."""
        return self._advance(self._client._step(self._step_request(tokens, top_k, temperature), timeout))

    def generate(self, max_tokens: int, *, tokens: Tokens | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: Sequence[str] = (), timeout: float | None = None) -> Iterator[GeneratedToken]:
        """Continue the session on the server, yielding each token as it is chosen.

        Greedy when `temperature` is 0; a `seed` makes a sampled continuation reproducible.
        `tokens` are fed first. Not retried; stopping early cancels the generation.
        """
        request = self._generate_request(tokens, max_tokens, temperature, top_k, top_p, seed, stop)
        call = self._client._inference.Generate(request, **self._client._connection.call_options(timeout, request))
        with self._generation(call):
            for response in call:
                yield self._generated(response)

    def info(self, *, timeout: float | None = None) -> SessionInfo:
        request = pb.GetSessionRequest(session_id=self.id)
        return SessionInfo.from_pb(self._client._unary(self._client._inference.GetSession, request, timeout,
                                                       retry_safe=True))

    def fork(self, count: int | None = None, *, ttl: int | None = None,
             timeout: float | None = None) -> Session | list[Session]:
        """New sessions at this one's state and position, each going on by itself: one, or a list of `count`.

        Cheap (a copy of a few KiB, nothing re-read), so it suits trying several continuations
        from one point. Forks close on leaving `with` like any session; `ttl` defaults to this
        one's. All or none are made (CapacityExhausted). Only from the position this session is
        at; never retried, since a resent fork whose first try landed would make a second set.
        """
        return self._client._call(self._fork(count, ttl), timeout)

    def reset(self, *, timeout: float | None = None) -> SessionInfo:
        """Back to position 0 of its initial state (zeros, or its named state), keeping its id and ttl.

        Retried when the position is known: a resend whose first try landed raises PositionMismatch
        with actual_position 0.
        """
        return self._client._call(self._reset(), timeout)

    def rewind(self, tokens: int, *, top_k: int = DEFAULT_TOP_K, temperature: float | None = None,
               timeout: float | None = None) -> Prediction | None:
        """Undo the last `tokens` read: the session then predicts exactly as if it had never read them.

        Returns the prediction at the new position (None at position 0 of zeros). At most
        `info().rewindable` tokens, else RewindBeyondDepth. Retried when the position is known:
        a resend whose first try landed raises PositionMismatch instead of undoing twice.
        """
        return self._client._call(self._rewind(tokens, top_k, temperature), timeout)

    def score(self, *continuations: Tokens, timeout: float | None = None) -> list[ContinuationScore]:
        """How likely each continuation (text or ids) is from here, per token and in total; nothing advances.

        Candidates of equal length share one model call, so ranking many options costs about as
        much as stepping one. Needs something read first: at position 0 of zeros nothing predicts.
        """
        return self._client._call(self._score(continuations), timeout)

    def peek(self, tokens: Tokens, *, top_k: int = DEFAULT_TOP_K, temperature: float | None = None,
             timeout: float | None = None) -> Prediction:
        """What `step(tokens)` would answer, without advancing the session (for look-ahead, or a UI's preview)."""
        return self._client._call(self._peek(tokens, top_k, temperature), timeout)

    def export(self, *, timeout: float | None = None) -> bytes:
        """The session as a blob (a few KiB) that `import_session` continues from, here or on another server.

        The session goes on unchanged; the blob carries its position and the tokens it can
        rewind, checked by checksum and bound to the model it was exported from.
        """
        return self._client._call(self._export(), timeout)

    def close(self, *, timeout: float | None = None) -> None:
        """Free the session's state; one that is already gone (closed, expired, evicted) counts as closed."""
        if self._client._steps is not None:
            self._client._steps.forget(self.id)
        with contextlib.suppress(SessionNotFound):
            self._client._unary(self._client._inference.CloseSession, pb.CloseSessionRequest(session_id=self.id),
                                timeout, retry_safe=True)


_END_OF_REQUESTS = object()


class StepStream:
    """Steps of one or several sessions over one Stream call; each `step` waits for its answer.

    Not thread-safe: answers are matched to steps by order. A failed step raises the same
    exception a unary step would, and the stream goes on.
    """

    def __init__(self, client: Client, timeout: float | None):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._responses = client._inference.Stream(iter(self._requests.get, _END_OF_REQUESTS), timeout=timeout,
                                                   metadata=client._connection.metadata)

    def __enter__(self) -> StepStream:
        return self

    def __exit__(self, exc_type: type | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._responses.cancel()

    def step(self, target: Target, tokens: Tokens, *, top_k: int = DEFAULT_TOP_K,
             temperature: float | None = None) -> Prediction:
        """Feed `tokens` to `target` (a Session, whose position is tracked, or a session id)."""
        self._requests.put(step_request(target, tokens, top_k, temperature))
        with raising_rnnserve_errors():
            response = next(self._responses)
        return answer(target, response)

    def close(self) -> None:
        """Stop sending and wait for the server to end the stream."""
        self._requests.put(_END_OF_REQUESTS)
        with raising_rnnserve_errors():
            for _ in self._responses:
                pass
