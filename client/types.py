"""Plain values the clients return, each with `from_pb`: callers never handle protobuf messages.

The wire keeps a prediction as parallel arrays to stay small; here it becomes a list of
candidates, which is what a caller iterates over. Probabilities and logprobs are the float32
values on the wire, exactly (as Python floats): 0.6000000238418579, not a rounded 0.6 that
differs from the server's answer and from another client's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone

from google.protobuf.timestamp_pb2 import Timestamp

from rnnserve.v1 import rnnserve_pb2 as pb


@dataclass(frozen=True)
class Candidate:
    """One possible next token."""

    id: int
    text: str
    probability: float
    logprob: float


@dataclass(frozen=True)
class Prediction:
    """The most likely next tokens, most likely first, after the session reached `position`."""

    position: int
    candidates: list[Candidate]

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    @classmethod
    def from_pb(cls, prediction: pb.Prediction, position: int) -> Prediction:
        columns = zip(prediction.token_ids, prediction.texts, prediction.probabilities, prediction.logprobs)
        return cls(position, [Candidate(*column) for column in columns])


@dataclass(frozen=True)
class GeneratedToken:
    """One token of a continuation; `finish_reason` ("length" or "stop") is set on the last."""

    id: int
    text: str
    probability: float
    position: int
    finish_reason: str | None

    @classmethod
    def from_pb(cls, response: pb.GenerateResponse) -> GeneratedToken:
        finish = pb.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()
        return cls(response.token_id, response.text, response.probability, response.position,
                   None if finish == "unspecified" else finish)


def _datetime(timestamp: Timestamp) -> datetime:
    return timestamp.ToDatetime(tzinfo=timezone.utc)


@dataclass(frozen=True)
class SessionInfo:
    """A session as the server holds it; times are timezone-aware (UTC)."""

    id: str
    model: str
    position: int
    created: datetime
    last_active: datetime
    expires: datetime

    @classmethod
    def from_pb(cls, session: pb.Session) -> SessionInfo:
        return cls(session.session_id, session.model, session.position, _datetime(session.created),
                   _datetime(session.last_active), _datetime(session.expires))


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model as its bundle's manifest describes it."""

    name: str
    version: str
    cell: str
    layers: int
    hidden_size: int
    embed_size: int
    vocab_size: int
    sha256: str
    state_bytes_per_session: int
    metrics: dict[str, float]
    is_default: bool

    @classmethod
    def from_pb(cls, model: pb.Model) -> ModelInfo:
        """Field by field, by name: every field here has its namesake in the message."""
        values = {field.name: getattr(model, field.name) for field in dataclasses.fields(cls)}
        return cls(**{**values, "metrics": dict(model.metrics)})
