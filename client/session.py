"""What a client knows about one session between calls: its id and the position it is at.

The position is what makes retries safe. Every step carries it as expected_position, so a step
resent after a lost answer is recognised by the server and answered from its record instead of
being applied twice, and a step racing another writer fails with PositionMismatch instead of
feeding tokens at the wrong place. The sync and asyncio sessions, the stream helpers and
`step_batch` all keep it through this one class.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar, Union

import grpc

from rnnserve.client import messages
from rnnserve.client.connection import ClientBase
from rnnserve.client.errors import RnnserveError, error_from_status, raising_rnnserve_errors
from rnnserve.client.messages import Tokens
from rnnserve.client.types import GeneratedToken, Prediction
from rnnserve.v1 import rnnserve_pb2 as pb


_Handle = TypeVar("_Handle", bound="SessionHandle")


class SessionHandle:
    """Base of `Session` and `AsyncSession`: request building and position bookkeeping."""

    def __init__(self, client: ClientBase, session: pb.Session, prediction: pb.Prediction | None = None):
        self._client = client
        self.id = session.session_id
        self.model = session.model
        # None after a generation ended early: the server may have sent tokens we never read.
        # The next answer tells the position again; until then steps go without expected_position.
        self.position: int | None = session.position
        # The prediction after the prompt the session was opened with; None otherwise.
        self.prediction = Prediction.from_pb(prediction, session.position) if prediction is not None else None

    @classmethod
    def _created(cls: type[_Handle], client: ClientBase, response: pb.CreateSessionResponse) -> _Handle:
        return cls(client, response.session, response.prediction if response.HasField("prediction") else None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, model={self.model!r}, position={self.position})"

    def _step_request(self, tokens: Tokens, top_k: int, temperature: float | None) -> pb.StepRequest:
        return messages.step(self.id, tokens, top_k, temperature, self.position)

    def _advance(self, response: pb.StepResponse) -> Prediction:
        self.position = response.position
        return Prediction.from_pb(response.prediction, response.position)

    def _generate_request(self, tokens: Tokens | None, max_tokens: int, temperature: float, top_k: int | None,
                          top_p: float | None, seed: int | None, stop: Sequence[str]) -> pb.GenerateRequest:
        return messages.generate(self.id, tokens, max_tokens, temperature, top_k, top_p, seed, stop, self.position)

    def _generated(self, response: pb.GenerateResponse) -> GeneratedToken:
        self.position = response.position
        return GeneratedToken.from_pb(response)

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
    return Prediction.from_pb(response.prediction, response.position)


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


def is_retry_safe(request: pb.StepRequest) -> bool:
    """A step may be resent only when the server can recognise it as a retry by its position."""
    return request.HasField("expected_position")
