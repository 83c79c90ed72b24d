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
class ContinuationScore:
    """How likely a candidate continuation is, token by token, from where the session was scored.

    Log-probabilities are natural logs at temperature 1; `ranks[i]` is 1 when token i was the
    most likely at its place. `total_logprob` compares candidates of different lengths unfairly
    (each token costs), so divide by `len(token_ids)` to compare them per token.
    """

    token_ids: list[int]
    texts: list[str]
    logprobs: list[float]
    ranks: list[int]
    total_logprob: float

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @classmethod
    def from_pb(cls, score: pb.ContinuationScore) -> ContinuationScore:
        return cls(list(score.token_ids), list(score.texts), list(score.logprobs),
                   list(score.ranks), score.total_logprob)


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
    """A session as the server holds it; times are timezone-aware (UTC).

    `initial_state` names the state it started from (None: zeros), where a reset takes it back;
    `rewindable` is how many of its last tokens `rewind` can undo now. `model_version` is the
    version of `model` it runs for its whole life, whatever becomes the default meanwhile.
    """

    id: str
    model: str
    position: int
    created: datetime
    last_active: datetime
    expires: datetime
    initial_state: str | None
    rewindable: int
    model_version: str

    @classmethod
    def from_pb(cls, session: pb.Session) -> SessionInfo:
        return cls(session.session_id, session.model, session.position, _datetime(session.created),
                   _datetime(session.last_active), _datetime(session.expires), session.initial_state or None,
                   session.rewindable, session.model_version)


@dataclass(frozen=True)
class NamedState:
    """A state sessions can start from (`initial_state=`): the state after reading `prompt_text` from zeros.

    `source` is "bundle" for states shipped with the model, which cannot be deleted, and
    "registered" for those made with `register_state`. The prompt is unknown (0 tokens, "") for
    shipped states that did not record it.
    """

    name: str
    source: str
    prompt_tokens: int
    prompt_text: str

    @classmethod
    def from_pb(cls, state: pb.NamedState) -> NamedState:
        return cls(state.name, state.source, state.prompt_tokens, state.prompt_text)


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model version as its bundle's manifest describes it, and how the server serves it now.

    `is_default`: requests naming no model get this version; `default_version`: requests naming
    this model and no version get it; `sessions` run on it now; `retiring`: it takes no new
    sessions and unloads once they end.
    """

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
    default_version: bool
    sessions: int
    retiring: bool
    vocabulary: str  # "characters", "tokenizer" (subwords) or "ids" (no text)
    states: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape without the batch axis, dtype), in graph order

    @classmethod
    def from_pb(cls, model: pb.Model) -> ModelInfo:
        """Field by field, by name: every field here has its namesake in the message."""
        values = {field.name: getattr(model, field.name) for field in dataclasses.fields(cls)}
        states = {state.name: (tuple(state.shape), state.dtype) for state in model.states}
        return cls(**{**values, "metrics": dict(model.metrics), "states": states})
