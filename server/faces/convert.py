"""Protobuf to engine inputs and back. Caller input is checked here, before any step joins a batch.

Every mistake a caller can make in a request is an InvalidArgument naming the field and its
limit, raised before anything is queued, so that a batch can only fail for a server fault.
Token ids, texts and top_k are checked against the vocabulary of the model version that will
read them: `Readers` keeps a RequestReader per loaded version.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import numpy as np
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from rnnserve.bundle import Bundle
from rnnserve.server.core.batcher import StepAnswer
from rnnserve.server.core.engine import CreateInput, GenerateInput, StepInput
from rnnserve.server.core.errors import InvalidArgument
from rnnserve.server.core.generate import Finish, GeneratedToken
from rnnserve.server.core.models import ModelRegistry
from rnnserve.server.core.named_states import NamedState, check_name
from rnnserve.server.core.operations import Scored
from rnnserve.server.core.prediction import Prediction
from rnnserve.server.core.sampling import SamplingParams
from rnnserve.server.core.served_model import ServedModel
from rnnserve.server.core.sessions import Session
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb

DEFAULT_TOP_K = 5
MAX_TEMPERATURE = 100.0
# A step's prediction divides float32 logits by its temperature; below this, 1/temperature (or the scaled logits)
# overflows float32 and the probabilities come out NaN. Anything colder is greedy to float32 precision anyway.
MIN_STEP_TEMPERATURE = 1e-6
MAX_STOP_STRINGS = 16
MAX_FORKS = 64
MAX_CONTINUATIONS = 64
MAX_STOP_CHARS = 64
# Up to this many ids, copying them one by one beats protobuf's conversion to an array, which has a fixed cost
# several times that of a single step's other checks; past it, the array conversion wins. A single id, the
# hot path, makes no array at all: each id's one-token array is made once and shared (read-only).
FEW_IDS = 64
# Session ids (32 characters) and model names come back in NOT_FOUND messages and ErrorInfo; quoting an unbounded
# one would let a small request make the server send trailers larger than clients accept (16 KiB by default).
MAX_NAME_CHARS = 128
# gRPC's default receive limit. A client that kept it loses an answer larger than this with RESOURCE_EXHAUSTED,
# after the steps were applied, so a StepBatch whose answer could exceed it is refused before any step runs.
CLIENT_RECEIVE_BYTES = 4 * 1024 * 1024
# The most one StepBatch answer takes besides its echoed session_id and its candidates: position, request_id and
# the fields' framing, or instead an in-band error (a google.rpc.Status quoting at most MAX_NAME_CHARS of the
# id, a few hundred bytes). tests/test_step_batch.py holds every kind of answer to this bound.
STEP_ANSWER_BYTES = 1024
FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, Finish.LENGTH: pb.FINISH_REASON_LENGTH,
                  Finish.STOP: pb.FINISH_REASON_STOP}


class Readers:
    """A RequestReader per loaded model version, made at its first request and gone with the version."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.checks = RequestChecks(settings)
        self._readers: weakref.WeakKeyDictionary[ServedModel, RequestReader] = weakref.WeakKeyDictionary()

    def of(self, model: ServedModel) -> RequestReader:
        reader = self._readers.get(model)
        if reader is None:
            reader = self._readers[model] = RequestReader(model.bundle, self.settings)
        return reader

    def step_batch(self, request: pb.StepBatchRequest, models: Iterable[ServedModel]) -> None:
        """`RequestReader.step_batch` by the reader whose answer to `request` could be largest: the steps' sessions
        may run any of the loaded `models`."""
        readers = [self.of(model) for model in models]
        max(readers, key=lambda reader: reader.answer_bytes(request.steps)).step_batch(request)


class RequestChecks:
    """What a request must satisfy whichever model reads it: the server's limits.

    Checked before the request's session is looked up, so that a malformed request is answered
    INVALID_ARGUMENT naming its field whether or not its session exists.
    """

    def __init__(self, settings: Settings):
        self.settings = settings

    @staticmethod
    def session_id(value: str) -> str:
        if not value:
            raise InvalidArgument("session_id", "required")
        return _quotable("session_id", value)

    @staticmethod
    def model_name(value: str, field: str = "name") -> str:
        """A model name; "" selects the default."""
        return _quotable(field, value)

    def fork(self, request: pb.ForkSessionRequest) -> tuple[int, int | None, int | None]:
        """(count, ttl or None for the source's, expected position)."""
        if request.count > MAX_FORKS:
            raise InvalidArgument("count", f"at most {MAX_FORKS} forks in one call (0 means 1)")
        return request.count or 1, self._ttl(request.ttl_seconds) or None, self.expected_position(request)

    @staticmethod
    def exported_state(request: pb.ImportSessionRequest) -> bytes:
        """The blob to import; which model reads the rest of the request depends on it."""
        if not request.state:
            raise InvalidArgument("state", "required: the bytes ExportSession answered")
        return request.state

    def _ttl(self, ttl_seconds: int) -> int:
        if ttl_seconds > self.settings.max_ttl_seconds:
            raise InvalidArgument("ttl_seconds", f"at most {self.settings.max_ttl_seconds} "
                                                 f"(0 means the default, {self.settings.default_ttl_seconds})")
        return ttl_seconds

    @staticmethod
    def _temperature(temperature: float) -> float:
        if not temperature:
            return 1.0
        if not MIN_STEP_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise InvalidArgument("temperature", f"must be in [{MIN_STEP_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] "
                                                 "(0 means 1)")
        return temperature

    @staticmethod
    def expected_position(request: Message) -> int | None:
        """The request's optional expected_position, every message that changes or copies a session has one."""
        if not request.HasField("expected_position"):
            return None
        if request.expected_position < 0:
            raise InvalidArgument("expected_position", "must be >= 0")
        return request.expected_position


    def generate_options(self, request: pb.GenerateRequest) -> SamplingParams:
        """The limits of a Generate request but its vocabulary's (top_k, tokens); its sampling parameters."""
        limit = self.settings.max_generate_tokens
        if not 1 <= request.max_tokens <= limit:
            raise InvalidArgument("max_tokens", f"must be in [1, {limit}]")
        if request.temperature and not 0.0 < request.temperature <= MAX_TEMPERATURE:
            raise InvalidArgument("temperature", f"must be in (0, {MAX_TEMPERATURE:g}] (0 means greedy)")
        if request.top_p and not 0.0 < request.top_p <= 1.0:
            raise InvalidArgument("top_p", "must be in (0, 1] (0 means 1, no limit)")
        if len(request.stop) > MAX_STOP_STRINGS or not all(0 < len(s) <= MAX_STOP_CHARS for s in request.stop):
            raise InvalidArgument("stop", f"at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} characters")
        return SamplingParams(request.temperature, request.top_k, request.top_p or 1.0,
                              request.seed if request.HasField("seed") else None)

    @staticmethod
    def rewind_count(request: pb.RewindSessionRequest) -> int:
        if not request.tokens:
            raise InvalidArgument("tokens", "must be at least 1: how many of the last tokens to undo")
        return request.tokens

    @staticmethod
    def continuation_count(request: pb.ScoreRequest) -> int:
        count = len(request.continuations)
        if not 1 <= count <= MAX_CONTINUATIONS:
            raise InvalidArgument("continuations", f"give 1 to {MAX_CONTINUATIONS} continuations, got {count}")
        return count


class RequestReader(RequestChecks):
    """Requests of the Inference service, checked against one model's vocabulary and the server's limits."""

    def __init__(self, bundle: Bundle, settings: Settings):
        super().__init__(settings)
        self.vocab = bundle.vocab
        self.vocab_size = len(bundle.vocab)
        self._one_token = [_read_only(np.array([token], np.int64)) for token in range(self.vocab_size)]
        # The hot path, a single id with every option at its default, reads to one of these: StepInput is
        # immutable, so one per id serves every such step (a third of the cost of reading the fields).
        self._plain_steps = [StepInput(tokens, self._top_k(0), self._temperature(0.0)) for tokens in self._one_token]
        self.candidate_bytes = candidate_bytes(bundle.vocab.tokens)

    def step(self, request: pb.StepRequest) -> StepInput:
        ids = request.token_ids
        if (len(ids) == 1 and not (request.text or request.top_k or request.temperature)
                and not request.HasField("expected_position") and 0 <= ids[0] < self.vocab_size):
            return self._plain_steps[ids[0]]
        tokens = self._tokens(ids, request.text, ("token_ids", "text"))
        if tokens is None:
            raise InvalidArgument("token_ids", "give token_ids or text: a step reads at least one token")
        return StepInput(tokens, self._top_k(request.top_k), self._temperature(request.temperature),
                         self.expected_position(request))

    def step_batch(self, request: pb.StepBatchRequest) -> None:
        """Refuse a StepBatch that breaks a limit of the message as a whole, before any of its steps is queued.

        Its steps would otherwise run (a session named twice, twice), or run and then be lost with an answer
        too large to deliver; the checks of each single step stay in-band (`step`). Call it on the reader of the
        reader whose answer could be largest (`Readers.step_batch`): the steps' sessions may run any version.
        """
        steps, limit = request.steps, self.settings.max_batch_size
        if len(steps) > limit:
            raise InvalidArgument("steps", f"at most {limit} steps (the server's maximum batch size), got {len(steps)}")
        _each_session_once(steps)
        answer_bytes = self.answer_bytes(steps)
        if answer_bytes > CLIENT_RECEIVE_BYTES:
            raise InvalidArgument("steps", f"the answer could take {answer_bytes} bytes, over the {CLIENT_RECEIVE_BYTES} "
                                           f"a gRPC client accepts by default: send fewer steps or a smaller top_k "
                                           f"(each step counts {STEP_ANSWER_BYTES} bytes, its session_id and "
                                           f"{self.candidate_bytes} bytes per top_k)")

    def answer_bytes(self, steps) -> int:
        """An upper bound on the encoded StepBatchResponse to `steps`."""
        total = len(steps) * STEP_ANSWER_BYTES
        for step in steps:
            candidates = min(step.top_k or DEFAULT_TOP_K, self.vocab_size)  # a larger top_k is answered an error
            total += len(step.session_id.encode()) + candidates * self.candidate_bytes
        return total

    def create(self, request: pb.CreateSessionRequest) -> CreateInput:
        tokens = self._tokens(request.prompt_token_ids, request.prompt_text, ("prompt_token_ids", "prompt_text"))
        prompt = None if tokens is None else StepInput(tokens, self._top_k(request.top_k),
                                                       self._temperature(request.temperature))
        return CreateInput(self._ttl(request.ttl_seconds), prompt, _quotable("initial_state", request.initial_state))

    def rewind(self, request: pb.RewindSessionRequest) -> tuple[int, int | None, int, float]:
        """(tokens to undo, expected position, top_k, temperature)."""
        return (self.rewind_count(request), self.expected_position(request), self._top_k(request.top_k),
                self._temperature(request.temperature))

    def score(self, request: pb.ScoreRequest) -> list[np.ndarray]:
        self.continuation_count(request)
        continuations = []
        for index, continuation in enumerate(request.continuations):
            where = f"continuations[{index}]"
            tokens = self._tokens(continuation.token_ids, continuation.text, (f"{where}.token_ids", f"{where}.text"))
            if tokens is None:
                raise InvalidArgument(where, "give token_ids or text: a continuation has at least one token")
            continuations.append(tokens)
        total, limit = sum(len(tokens) for tokens in continuations), self.settings.max_input_tokens
        if total > limit:
            raise InvalidArgument("continuations", f"at most {limit} tokens in all, got {total}")
        return continuations

    def import_(self, request: pb.ImportSessionRequest) -> tuple[int, int, float]:
        """(ttl, top_k, temperature)."""
        return self._ttl(request.ttl_seconds), self._top_k(request.top_k), self._temperature(request.temperature)

    def register_state(self, request: pb.RegisterStateRequest) -> tuple[str, np.ndarray]:
        tokens = self._tokens(request.prompt_token_ids, request.prompt_text, ("prompt_token_ids", "prompt_text"))
        if tokens is None:
            raise InvalidArgument("prompt_text", "give prompt_text or prompt_token_ids: a named state is the state "
                                                 "after a prompt")
        return check_name(request.name), tokens

    def generate(self, request: pb.GenerateRequest) -> GenerateInput:
        sampling = self.generate_options(request)
        if request.top_k > self.vocab_size:
            raise InvalidArgument("top_k", f"at most the vocabulary size, {self.vocab_size} (0 means no limit)")
        if request.stop and not self.vocab.has_text:
            raise InvalidArgument("stop", f"this model's vocabulary is {self.vocab_size} ids with no text: "
                                          "nothing it generates can match a stop string")
        return GenerateInput(self._tokens(request.token_ids, request.text, ("token_ids", "text")), request.max_tokens,
                             sampling, tuple(request.stop), self.expected_position(request))

    def _tokens(self, ids, text: str, fields: tuple[str, str]) -> np.ndarray | None:
        """The tokens given as ids or as text ([time] int64), None when neither is given."""
        ids_field, text_field = fields
        if ids and text:
            raise InvalidArgument(text_field, f"give {ids_field} or {text_field}, not both")
        if text:
            return self._encode(text, text_field, ids_field)
        if not ids:
            return None
        count, limit, vocab = len(ids), self.settings.max_input_tokens, self.vocab_size
        if count == 1 and 0 <= ids[0] < vocab:
            return self._one_token[ids[0]]
        if count > limit:
            raise InvalidArgument(ids_field, f"at most {limit} ids, got {count}")
        if count <= FEW_IDS:
            values = tuple(ids)
            out_of_range = min(values) < 0 or max(values) >= vocab
            tokens = np.array(values, np.int64)
        else:
            tokens = np.array(ids, np.int64)
            out_of_range = tokens.view(np.uint64).max() >= vocab  # negative ids wrap around to huge values
        if out_of_range:
            raise InvalidArgument(ids_field, f"ids must be in [0, {vocab - 1}], the model's vocabulary")
        return tokens

    def _encode(self, text: str, text_field: str, ids_field: str) -> np.ndarray:
        """`text` as the model's tokens ([time] int64); refused when the vocabulary has no text or it encodes to
        no tokens or too many."""
        if not self.vocab.has_text:
            raise InvalidArgument(text_field, f"this model's vocabulary is {self.vocab_size} ids with no text: "
                                              f"give {ids_field}")
        limit = self.settings.max_input_chars
        if len(text) > limit:
            raise InvalidArgument(text_field, f"at most {limit} characters, got {len(text)}")
        tokens = self.vocab.encode(text)
        if not len(tokens):
            raise InvalidArgument(text_field, "encodes to no tokens in this model's vocabulary")
        if len(tokens) > self.settings.max_input_tokens:
            raise InvalidArgument(text_field, f"at most {self.settings.max_input_tokens} tokens, got {len(tokens)}")
        return tokens

    def _top_k(self, top_k: int) -> int:
        if top_k > self.vocab_size:
            raise InvalidArgument("top_k", f"must be in [1, {self.vocab_size}], the vocabulary size "
                                           f"(0 means {DEFAULT_TOP_K})")
        return top_k or min(DEFAULT_TOP_K, self.vocab_size)

class ResponseWriter:
    """Engine results as responses of the Inference service, whichever model version they came from."""

    @staticmethod
    def prediction(prediction: Prediction, into: pb.Prediction) -> None:
        """Fill `into`, a message inside its response: extending its fields in place costs far less than
        building a Prediction and having protobuf copy it into the response."""
        into.token_ids.extend(prediction.token_ids)
        into.texts.extend(prediction.texts)
        into.probabilities.extend(prediction.probabilities)
        into.logprobs.extend(prediction.logprobs)

    @classmethod
    def step(cls, request: pb.StepRequest, answer: StepAnswer, into: pb.StepResponse | None = None) -> pb.StepResponse:
        """The answer to `request`, written into `into` (e.g. a StepBatchResponse's `results.add()`) if given."""
        response = pb.StepResponse() if into is None else into
        response.session_id = request.session_id
        response.position = answer.position
        response.request_id = request.request_id
        cls.prediction(answer.prediction, response.prediction)
        return response

    @staticmethod
    def step_error(request: pb.StepRequest, status, position: int,
                   into: pb.StepResponse | None = None) -> pb.StepResponse:
        """The in-band answer to a failed step: its status, and `position`, where the session stands."""
        response = pb.StepResponse() if into is None else into
        response.session_id = request.session_id
        response.position = position
        response.request_id = request.request_id
        response.error.CopyFrom(status)
        return response

    @staticmethod
    def session(session: Session) -> pb.Session:
        return pb.Session(session_id=session.id, model=session.model.name, model_version=session.model.version,
                          position=session.position,
                          created=_timestamp(session.created_wall),
                          last_active=_timestamp(session.wall(session.last_active)),
                          expires=_timestamp(session.wall(session.expires)),
                          initial_state="" if session.initial is None else session.initial.name,
                          rewindable=session.rewindable)

    @classmethod
    def moved(cls, session: Session, prediction: Prediction | None,
              into: pb.RewindSessionResponse | pb.ImportSessionResponse) -> None:
        """A session that arrived somewhere without a step (rewound, imported), and what it predicts there."""
        into.session.CopyFrom(cls.session(session))
        if prediction is not None:
            cls.prediction(prediction, into.prediction)

    @staticmethod
    def scores(position: int, scored: list[Scored]) -> pb.ScoreResponse:
        response = pb.ScoreResponse(position=position)
        for candidate in scored:
            response.scores.add(token_ids=candidate.tokens.tolist(), texts=candidate.texts,
                                logprobs=candidate.logprobs.tolist(), ranks=candidate.ranks.tolist(),
                                total_logprob=candidate.total)
        return response

    @staticmethod
    def named_state(state: NamedState, model: ServedModel) -> pb.NamedState:
        """`state`, one of `model`'s (whose vocabulary spells its prompt)."""
        tokens = () if state.tokens is None else state.tokens.tolist()
        return pb.NamedState(name=state.name, source=state.source, prompt_tokens=len(tokens),
                             prompt_text=model.bundle.vocab.decode(tokens))

    @staticmethod
    def generated(token: GeneratedToken) -> pb.GenerateResponse:
        return pb.GenerateResponse(token_id=token.token_id, text=token.text, probability=token.probability,
                                   position=token.position, finish_reason=FINISH_REASONS[token.finish])

    @staticmethod
    def model(model: ServedModel, models: ModelRegistry) -> pb.Model:
        bundle = model.bundle
        sizes = bundle.manifest["sizes"]
        metrics = {key: float(value) for key, value in bundle.manifest.get("metrics", {}).items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        # layers, hidden and embed sizes describe the recurrent cells rnnserve-train makes; other architectures
        # leave them out of the manifest and answer 0 (their state shapes are in the manifest's "state").
        return pb.Model(name=bundle.name, version=bundle.version, cell=bundle.cell, layers=sizes.get("layers", 0),
                        hidden_size=sizes.get("hidden_size", 0), embed_size=sizes.get("embed_size", 0),
                        vocab_size=sizes["vocab_size"], sha256=bundle.sha256,
                        state_bytes_per_session=bundle.state_bytes_per_session, metrics=metrics,
                        is_default=models.is_server_default(model), default_version=models.is_default(model),
                        sessions=model.sessions, retiring=model.retiring, vocabulary=bundle.vocab.kind,
                        states=[pb.StateTensor(name=s.name, shape=s.shape, dtype=s.dtype) for s in bundle.states])


def _each_session_once(steps) -> None:
    """Refuse a session's second step: StepBatch promises each session at most one, so a repeat is a caller's
    mistake (say, a gateway that merged two users' steps), not a request to step twice."""
    first_index: dict[str, int] = {}
    for index, step in enumerate(steps):
        earlier = first_index.setdefault(step.session_id, index)
        if earlier != index:
            field = f"steps[{index}].session_id"
            raise InvalidArgument(field, f"session {_quotable(field, step.session_id)!r} is also steps[{earlier}]'s: "
                                         "a StepBatch names each session at most once")


def candidate_bytes(texts: list[str]) -> int:
    """The most one candidate adds to an encoded Prediction: its id (a varint in a packed field), its text (tag,
    length, UTF-8) and its probability and logprob (4 bytes each in packed fields)."""
    longest = max(len(text.encode()) for text in texts)
    return _varint_bytes(len(texts) - 1) + 1 + _varint_bytes(longest) + longest + 2 * 4


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _quotable(field: str, value: str) -> str:
    """`value`, when it is short enough to be quoted back in an error."""
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(field, f"at most {MAX_NAME_CHARS} characters, got {len(value)}")
    return value


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp

