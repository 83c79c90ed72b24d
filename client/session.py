"""What a client knows about one session between calls: its id and the position it is at.

The position is what makes retries safe. Every step carries it as expected_position, so a step
resent after a lost answer is recognised by the server and answered from its record instead of
being applied twice, and a step racing another writer fails with PositionMismatch instead of
feeding tokens at the wrong place. The sync and asyncio sessions, the stream helpers and
`step_batch` all keep it through this one class.

The session operations carry it too. Those that only read (score, peek, export) are retried
freely; reset and rewind, which move the session, are retried when they carry it: a resend whose
first try landed finds the session moved and is refused with PositionMismatch instead of undoing
more. A fork is never retried: the source does not move, so a resent fork would make a second set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar, Union

import grpc

from rnnserve.client import messages
from rnnserve.client.calls import Call
from rnnserve.client.connection import ClientBase
from rnnserve.client.errors import RnnserveError, error_from_status, raising_rnnserve_errors
from rnnserve.client.messages import Tokens
from rnnserve.client.types import ContinuationScore, GeneratedToken, Prediction, SessionInfo
from rnnserve.v1 import rnnserve_pb2 as pb


_Handle = TypeVar("_Handle", bound="SessionHandle")

# Responses that open or move a session and may hold the prediction where it now is.
_Moved = Union[pb.CreateSessionResponse, pb.RewindSessionResponse, pb.ImportSessionResponse]


def _prediction_of(response: _Moved) -> Prediction | None:
    """The prediction a response holds; None when nothing predicts yet (no prompt, or back at 0 of zeros)."""
    if not response.HasField("prediction"):
        return None
    unknown = response.unknown_characters if isinstance(response, pb.CreateSessionResponse) else 0
    return Prediction.from_pb(response.prediction, response.session.position, unknown)


class SessionHandle:
    """Base of `Session` and `AsyncSession`: request building and position bookkeeping."""

    def __init__(self, client: ClientBase, session: pb.Session, prediction: Prediction | None = None,
                 cached_prompt_tokens: int = 0):
        self._client = client
        self.id = session.session_id
        self.model = session.model
        self.model_version = session.model_version  # the version it runs for its whole life
        # None after a generation ended early: the server may have sent tokens we never read.
        # The next answer tells the position again; until then steps go without expected_position.
        self.position: int | None = session.position
        # The prediction after the prompt the session was opened with (or where an imported one
        # was); None otherwise.
        self.prediction = prediction
        # Prompt tokens whose state the server took from its prefix-state cache instead of reading them.
        self.cached_prompt_tokens = cached_prompt_tokens

    @classmethod
    def _created(cls: type[_Handle], client: ClientBase, response: pb.CreateSessionResponse) -> _Handle:
        return cls(client, response.session, _prediction_of(response), response.cached_prompt_tokens)

    @classmethod
    def _import(cls: type[_Handle], client: ClientBase, state: bytes, ttl: int | None, top_k: int,
                temperature: float | None) -> Call[_Handle]:
        """Not retried, as opening a session is not: a lost answer would leave an unused session until its ttl."""
        return Call("ImportSession", messages.import_session(state, ttl, top_k, temperature), False,
                    lambda response: cls(client, response.session, _prediction_of(response)))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(id={self.id!r}, model={self.model!r}, model_version={self.model_version!r}, "
                f"position={self.position})")

    def _step_request(self, tokens: Tokens, top_k: int, temperature: float | None) -> pb.StepRequest:
        return messages.step(self.id, tokens, top_k, temperature, self.position)

    def _advance(self, response: pb.StepResponse) -> Prediction:
        self.position = response.position
        return Prediction.of_step(response)

    def _generate_request(self, tokens: Tokens | None, max_tokens: int, temperature: float, top_k: int | None,
                          top_p: float | None, seed: int | None, stop: Sequence[str]) -> pb.GenerateRequest:
        return messages.generate(self.id, tokens, max_tokens, temperature, top_k, top_p, seed, stop, self.position)

    def _generated(self, response: pb.GenerateResponse) -> GeneratedToken:
        self.position = response.position
        return GeneratedToken.from_pb(response)

    def _reported(self, session: pb.Session) -> SessionInfo:
        """The session as an answer describes it; its position is known again if it was not."""
        self.position = session.position
        return SessionInfo.from_pb(session)

    def _fork(self, count: int | None, ttl: int | None) -> Call[_Handle | list[_Handle]]:
        """Forks of this session: one session for no `count`, else a list of `count`. Never retried (see above)."""
        def forks(response: pb.ForkSessionResponse) -> _Handle | list[_Handle]:
            made = [type(self)(self._client, session) for session in response.sessions]
            return made[0] if count is None else made

        request = messages.fork(self.id, 1 if count is None else count, ttl, self.position)
        return Call("ForkSession", request, False, forks)

    def _reset(self) -> Call[SessionInfo]:
        request = pb.ResetSessionRequest(session_id=self.id, expected_position=self.position)
        return Call("ResetSession", request, is_retry_safe(request), self._reported)

    def _rewind(self, tokens: int, top_k: int, temperature: float | None) -> Call[Prediction | None]:
        def rewound(response: pb.RewindSessionResponse) -> Prediction | None:
            self._reported(response.session)
            return _prediction_of(response)

        request = messages.rewind(self.id, tokens, top_k, temperature, self.position)
        return Call("RewindSession", request, is_retry_safe(request), rewound)

    def _score(self, continuations: Sequence[Tokens]) -> Call[list[ContinuationScore]]:
        def scored(response: pb.ScoreResponse) -> list[ContinuationScore]:
            self.position = response.position
            return [ContinuationScore.from_pb(score) for score in response.scores]

        return Call("Score", messages.score(self.id, continuations, self.position), True, scored)

    def _peek(self, tokens: Tokens, top_k: int, temperature: float | None) -> Call[Prediction]:
        """As a step, but the session stays where it is: the answer's position is where the step would take it."""
        return Call("Peek", self._step_request(tokens, top_k, temperature), True,
                    Prediction.of_step)

    def _export(self) -> Call[bytes]:
        def exported(response: pb.ExportSessionResponse) -> bytes:
            self._reported(response.session)
            return response.state

        request = pb.ExportSessionRequest(session_id=self.id, expected_position=self.position)
        return Call("ExportSession", request, True, exported)

    @contextmanager
    def _generation(self, call: grpc.Call | grpc.aio.Call) -> Iterator[None]:
        """Around reading a Generate call: cancel it when the reader stops early or it fails.

        A cancelled generation leaves the session at the last token the server *sent*, which
        may be past the last one read here, so the position becomes unknown.
        """
        finished = False
        try:
            with raising_rnnserve_errors():
                yield
            finished = True
        finally:
            if not finished:
                call.cancel()
                self.position = None


# A step's target: a session object (position tracked) or a bare session id (no retry safety).
Target = Union[SessionHandle, str]


def step_request(target: Target, tokens: Tokens, top_k: int, temperature: float | None) -> pb.StepRequest:
    if isinstance(target, SessionHandle):
        return target._step_request(tokens, top_k, temperature)
    return messages.step(target, tokens, top_k, temperature, None)


def answer(target: Target, response: pb.StepResponse) -> Prediction:
    """The prediction in a Stream or StepBatch answer; an in-band failure raises as a unary one would."""
    if response.HasField("error"):
        raise error_from_status(response.error)
    if isinstance(target, SessionHandle):
        return target._advance(response)
    return Prediction.of_step(response)


def batch_request(steps: Sequence[tuple[Target, Tokens]], top_k: int,
                  temperature: float | None) -> pb.StepBatchRequest:
    return pb.StepBatchRequest(steps=[step_request(target, tokens, top_k, temperature) for target, tokens in steps])


def batch_results(targets: Sequence[Target], response: pb.StepBatchResponse) -> list[Prediction | RnnserveError]:
    """One result per step, at its index: a failed step is returned, not raised, so the others survive."""
    results: list[Prediction | RnnserveError] = []
    for target, result in zip(targets, response.results, strict=True):
        try:
            results.append(answer(target, result))
        except RnnserveError as error:
            results.append(error)
    return results


def is_retry_safe(request: pb.StepRequest | pb.ResetSessionRequest | pb.RewindSessionRequest) -> bool:
    """A call that moves the session may be resent only when it carries the position it expects.

    The server then answers a resent step from its record, and refuses a reset or rewind whose
    first try landed (the session has moved) instead of applying it again.
    """
    return request.HasField("expected_position")
