"""One v2 inference request as engine calls: Triton's sequence parameters name a session of the caller's.

A sequence's session has an id derived from the caller's identity, the model's name and the
sequence_id, so the face keeps no table of its own: the session table finds it, its TTL ends an idle
sequence, and a snapshot or the session store carries it like any session. Another identity's
sequence of the same id is another session. The request's tokens and options are read by the same
`RequestReader` as rnnserve's own Step and CreateSession (its checks, its limits), and a failure
of the caller's is answered in v2 terms: the input or parameter it names, and Triton's message
for a sequence that was never started.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from rnnserve.server.core.batcher import StepAnswer
from rnnserve.server.core.engine import Engine
from rnnserve.server.core.errors import InvalidArgument, SessionNotFound
from rnnserve.server.core.served_model import ServedModel
from rnnserve.server.faces.convert import DEFAULT_TOP_K, Readers, RequestReader, ResponseWriter
from rnnserve.server.faces.kserve.tensors import BYTES, Tensor, objects
from rnnserve.v1 import rnnserve_pb2 as pb

TOKEN_IDS, TEXT = "TOKEN_IDS", "TEXT"
# What each output holds, by the name a request asks for it; a request that names none gets DEFAULT_OUTPUTS.
TOP_IDS, TOP_PROBABILITIES, TOP_TEXTS = "TOP_IDS", "TOP_PROBABILITIES", "TOP_TEXTS"
PROBABILITIES, LOGPROBS = "PROBABILITIES", "LOGPROBS"
OUTPUT_DATATYPES = {TOP_IDS: "INT64", TOP_PROBABILITIES: "FP32", TOP_TEXTS: BYTES, PROBABILITIES: "FP32",
                    LOGPROBS: "FP32"}
DEFAULT_OUTPUTS = (TOP_IDS, TOP_PROBABILITIES, TOP_TEXTS)
WHOLE_VOCABULARY = (PROBABILITIES, LOGPROBS)  # [1, V]: the others are [1, top_k]
# rnnserve's request fields, as the v2 request names them in an error.
V2_FIELDS = {"prompt_token_ids": TOKEN_IDS, "token_ids": TOKEN_IDS, "prompt_text": TEXT, "text": TEXT,
             "top_k": "parameters.top_k", "temperature": "parameters.temperature",
             "initial_state": "parameters.initial_state", "model": "model_name", "model_version": "model_version"}


@dataclass(frozen=True)
class InferCall:
    """A v2 inference request, whichever transport brought it."""

    model_name: str
    model_version: str
    id: str
    parameters: Mapping[str, object]  # bool, int, float or str values
    inputs: list[Tensor]
    outputs: list[str]  # the outputs asked for; empty for DEFAULT_OUTPUTS


@dataclass(frozen=True)
class InferAnswer:
    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]
    parameters: Mapping[str, object]


@dataclass(frozen=True)
class Sequence:
    """Triton's sequence parameters of a request, and rnnserve's own options."""

    id: int | str
    start: bool
    end: bool
    initial_state: str
    top_k: int
    temperature: float

    @classmethod
    def read(cls, parameters: Mapping[str, object], model_name: str) -> Sequence:
        sequence_id = parameters.get("sequence_id", 0)
        if isinstance(sequence_id, bool) or not isinstance(sequence_id, (int, str)) or sequence_id in (0, ""):
            raise InvalidArgument("parameters.sequence_id", f"inference request to model '{model_name}' must specify "
                                  "a non-zero or non-empty correlation ID: every rnnserve model is stateful")
        if isinstance(sequence_id, int) and not 0 < sequence_id < 2 ** 64:
            raise InvalidArgument("parameters.sequence_id", "a uint64 (or a string)")
        if isinstance(sequence_id, str) and len(sequence_id) > 128:
            raise InvalidArgument("parameters.sequence_id", "a string of at most 128 characters (or a uint64)")
        top_k = _parameter(parameters, "top_k", int, DEFAULT_TOP_K)
        if top_k < 1:
            raise InvalidArgument("parameters.top_k", f"at least 1 (and at most the vocabulary size), got {top_k}")
        return cls(sequence_id, _parameter(parameters, "sequence_start", bool, False),
                   _parameter(parameters, "sequence_end", bool, False),
                   _parameter(parameters, "initial_state", str, ""), top_k,
                   float(_parameter(parameters, "temperature", (float, int), 0.0)))

    def session_id(self, owner: str, model_name: str) -> str:
        """The id of this sequence's session: the same for the same caller, model and sequence_id, and for nothing
        else (a hash, so no name of the caller's shows in it)."""
        kind = "u" if isinstance(self.id, int) else "s"
        key = "\0".join((owner, model_name, f"{kind}:{self.id}")).encode()
        return "seq-" + hashlib.sha256(key).hexdigest()[:32]


def _parameter(parameters: Mapping[str, object], name: str, kind: type | tuple[type, ...], default: object):
    value = parameters.get(name, default)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InvalidArgument(f"parameters.{name}", f"a {names} parameter, got {value!r}")
    return value


def no_such_sequence(sequence: Sequence, model_name: str, why: str) -> InvalidArgument:
    """Triton's answer to a request of a sequence that is not in progress and does not start it."""
    return InvalidArgument("parameters.sequence_start", f"inference request for sequence {sequence.id} to model "
                                                        f"'{model_name}' must specify the START flag on the first "
                                                        f"request of the sequence ({why})")


def in_v2_terms(error: InvalidArgument) -> InvalidArgument:
    """`error` naming the v2 request's input or parameter in place of rnnserve's field."""
    field, _, index = error.field.partition("[")
    if field not in V2_FIELDS:
        return error
    return InvalidArgument(V2_FIELDS[field] + (f"[{index}" if index else ""), error.description)


class Inference:
    """The v2 face's operations: sequences and models, over the engine."""

    def __init__(self, engine: Engine, readers: Readers):
        self._engine = engine
        self._models = engine.models
        self._readers = readers

    def model(self, name: str, version: str) -> ServedModel:
        """The loaded model version a request names (its default version for an empty one)."""
        return self._models.find(RequestReader.model_name(name, "model_name"),
                                 RequestReader.model_name(version, "model_version"))

    def vocab_size(self, model: ServedModel) -> int:
        return ResponseWriter.model(model, self._models).vocab_size

    def versions(self, name: str) -> list[str]:
        return [model.bundle.version for model in self._models.all() if model.bundle.name == name]

    async def infer(self, call: InferCall, owner: str, deadline: float | None) -> InferAnswer:
        """Run one request of a sequence: open it (sequence_start), step it, close it after the answer
        (sequence_end)."""
        if not call.model_name:
            raise InvalidArgument("model_name", "the model's name, as ModelMetadata has it: a sequence is of one model")
        sequence = Sequence.read(call.parameters, call.model_name)
        ids, text = self._tokens(call)
        outputs = self._outputs(call)
        try:
            if sequence.start:
                model, answer = await self._start(call, sequence, owner, ids, text, outputs)
            else:
                model, answer = await self._step(call, sequence, owner, ids, text, outputs, deadline)
        except InvalidArgument as error:
            raise in_v2_terms(error) from None
        if sequence.end:
            await self._engine.close_session(sequence.session_id(owner, model.bundle.name), owner)
        return InferAnswer(model.bundle.name, model.bundle.version, call.id,
                           self._answer(outputs, answer, sequence.top_k, model),
                           {"sequence_position": answer.position})

    async def _start(self, call: InferCall, sequence: Sequence, owner: str, ids: list[int] | None, text: str,
                     outputs: list[str]) -> tuple[ServedModel, StepAnswer]:
        model = self._models.get(RequestReader.model_name(call.model_name, "model_name"),
                                 RequestReader.model_name(call.model_version, "model_version"))
        session_id = sequence.session_id(owner, model.bundle.name)
        request = pb.CreateSessionRequest(model=call.model_name, model_version=call.model_version,
                                          prompt_token_ids=ids or [], prompt_text=text,
                                          top_k=self._top_k(sequence, outputs, model), temperature=sequence.temperature,
                                          initial_state=sequence.initial_state)
        create = dataclasses.replace(self._readers.of(model).create(request), session_id=session_id)
        if await self._in_progress(session_id, owner):
            raise InvalidArgument("parameters.sequence_start", f"inference request for sequence {sequence.id} to "
                                  f"model '{model.bundle.name}' has the START flag, but that sequence is in progress: "
                                  "end it first (sequence_end), or start another sequence_id")
        created = await self._engine.create_session(owner, model, create)
        return model, created.answer

    async def _in_progress(self, session_id: str, owner: str) -> bool:
        """Whether the caller's sequence is live: held here, or (with a session store) at rest or on another
        replica, from where it is taken, as a later request of the sequence would take it."""
        try:
            await self._engine.find_session(session_id, owner)
        except SessionNotFound:
            return False
        return True

    async def _step(self, call: InferCall, sequence: Sequence, owner: str, ids: list[int] | None, text: str,
                    outputs: list[str], deadline: float | None) -> tuple[ServedModel, StepAnswer]:
        session_id = sequence.session_id(owner, RequestReader.model_name(call.model_name, "model_name"))
        try:
            model = await self._engine.model_of(session_id, owner)
            request = pb.StepRequest(session_id=session_id, token_ids=ids or [], text=text,
                                     top_k=self._top_k(sequence, outputs, model), temperature=sequence.temperature)
            answer = await self._engine.step(session_id, owner, lambda model: self._readers.of(model).step(request),
                                             deadline)
        except SessionNotFound as error:
            raise no_such_sequence(sequence, call.model_name, f"the sequence {error.how}") from None
        return model, answer

    def _top_k(self, sequence: Sequence, outputs: list[str], model: ServedModel) -> int:
        """The candidates the engine is asked for: the whole vocabulary when a [1, V] output is wanted."""
        if any(name in WHOLE_VOCABULARY for name in outputs):
            if not 1 <= sequence.top_k <= self.vocab_size(model):
                raise InvalidArgument("parameters.top_k", f"1..{self.vocab_size(model)}, the vocabulary size")
            return self.vocab_size(model)
        return sequence.top_k

    @staticmethod
    def _tokens(call: InferCall) -> tuple[list[int] | None, str]:
        """The request's tokens: TOKEN_IDS (INT64 [1, T]) or TEXT (BYTES [1] or [1, 1]), exactly one."""
        by_name = {tensor.name: tensor for tensor in call.inputs}
        unknown = sorted(set(by_name) - {TOKEN_IDS, TEXT})
        if unknown or len(by_name) != 1 or len(call.inputs) != 1:
            what = f"unexpected inference input '{unknown[0]}'" if unknown else f"{len(call.inputs)} inputs"
            raise InvalidArgument("inputs", f"{what} for model '{call.model_name}': send exactly one of {TOKEN_IDS} "
                                            f"(INT64 [1, T]) and {TEXT} (BYTES [1])")
        [tensor] = call.inputs
        expected = {TOKEN_IDS: "INT64", TEXT: BYTES}[tensor.name]
        if tensor.datatype != expected:
            raise InvalidArgument(tensor.name, f"inference input '{tensor.name}' has datatype {tensor.datatype}, but "
                                               f"model '{call.model_name}' expects {expected}")
        shape = tensor.shape
        if tensor.name == TOKEN_IDS:
            if len(shape) != 2 or shape[0] != 1 or shape[1] < 1:
                raise InvalidArgument(TOKEN_IDS, f"unexpected shape {shape} for inference input '{TOKEN_IDS}' of "
                                                 f"model '{call.model_name}': expected [1, -1] (one sequence, "
                                                 "T >= 1 tokens)")
            ids = tensor.data.reshape(-1)
            # rnnserve's own requests carry ids as int32: an INT64 id beyond that is outside any vocabulary, and is
            # given as -1 so that the reader refuses it as it refuses every id outside the model's vocabulary.
            return np.where((ids < 0) | (ids > np.iinfo(np.int32).max), -1, ids).tolist(), ""
        if shape not in ([1], [1, 1]):
            raise InvalidArgument(TEXT, f"unexpected shape {shape} for inference input '{TEXT}' of model "
                                        f"'{call.model_name}': expected [1] (one string)")
        try:
            return None, tensor.data.reshape(-1)[0].decode()
        except (UnicodeDecodeError, AttributeError):
            raise InvalidArgument(TEXT, "UTF-8 text") from None

    @staticmethod
    def _outputs(call: InferCall) -> list[str]:
        for name in call.outputs:
            if name not in OUTPUT_DATATYPES:
                raise InvalidArgument("outputs", f"unexpected inference output '{name}' for model "
                                                 f"'{call.model_name}': it answers {', '.join(OUTPUT_DATATYPES)}")
        return list(dict.fromkeys(call.outputs)) or list(DEFAULT_OUTPUTS)

    def _answer(self, outputs: list[str], answer: StepAnswer, top_k: int, model: ServedModel) -> list[Tensor]:
        prediction = answer.prediction
        columns = {TOP_IDS: lambda: np.array([prediction.token_ids[:top_k]], np.int64),
                   TOP_PROBABILITIES: lambda: np.array([prediction.probabilities[:top_k]], np.float32),
                   TOP_TEXTS: lambda: objects([text.encode() for text in prediction.texts[:top_k]]).reshape(1, -1),
                   PROBABILITIES: lambda: self._by_id(prediction.token_ids, prediction.probabilities, model),
                   LOGPROBS: lambda: self._by_id(prediction.token_ids, prediction.logprobs, model)}
        return [Tensor(name, OUTPUT_DATATYPES[name], columns[name]()) for name in outputs]

    def _by_id(self, token_ids: list[int], values: list[float], model: ServedModel) -> np.ndarray:
        """[1, V] float32: each token's value at its id (the prediction lists them most likely first)."""
        row = np.empty((1, self.vocab_size(model)), np.float32)
        row[0, token_ids] = values
        return row
