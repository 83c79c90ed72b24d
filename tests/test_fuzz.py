"""Property-based fuzzing of a live server (issue 6, invariant 3): bad input never hurts anyone else.

Hypothesis drives every method of the Inference service with generated requests: extreme and
random ids and numbers, NaN and infinite floats, empty, odd-Unicode and over-limit fields,
bytes that are not protobuf or hold invalid UTF-8, messages over the size limit, unknown,
closed and other callers' sessions, missing and wrong tokens, tiny deadlines and calls
cancelled mid-stream and mid-generation. Across at least 10,000 requests:

- the server answers every one with a caller's-mistake status (or OK), never INTERNAL or
  UNKNOWN, in-band or not, and logs no fault; every probability it gives is one;
- it still answers the health check afterwards;
- "bystander" sessions, stepped by every kind of call on another connection under another token
  throughout, predict exactly (bit for bit) what the same conversation predicts on a server
  nobody fuzzes.

Every call is made with the synchronous grpc client, whose statuses are the server's: unlike
grpc.aio's, it reports no INTERNAL of its own when a call ends while it is still writing. The
only statuses the client makes up itself here are CANCELLED and DEADLINE_EXCEEDED, for the
calls this test cancels or gives tiny deadlines.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnserve.server.faces.wire import SERVICE
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import TINY_TEXT, raw_method

BYSTANDER = "bystander-token-0123456789"
FUZZER = "fuzzer-token-0123456789"
LIMIT = 32  # max_input_tokens and max_input_chars of the fuzzed server: over-limit fields stay cheap
MAX_MESSAGE_BYTES = 8192
LIMITS = dict(max_input_tokens=LIMIT, max_input_chars=LIMIT, max_generate_tokens=16,
              max_message_bytes=MAX_MESSAGE_BYTES, max_ttl_seconds=600, default_ttl_seconds=600)
MIN_REQUESTS = 10_000
EXAMPLES = 50  # per round of examples; rounds go on until MIN_REQUESTS were sent
TIMEOUT = 30.0

# Statuses that answer a caller's mistake, or the caller's own cancel or deadline; INTERNAL and UNKNOWN are not.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
# Statuses a call can end with before its token is looked at: the caller's cancel or deadline, an oversized message.
ENDED_EARLY = {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
IN_BAND_ALLOWED = {code.value[0] for code in ALLOWED - {grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED}}
METHODS = {method.name: method for method in SERVICE.methods}

# Generated values ----------------------------------------------------------------------------------


def _weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each as often as its weight."""
    return st.sampled_from([strategy for weight, strategy in choices for _ in range(weight)]).flatmap(lambda s: s)


def _mostly(valid: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a valid value, so that requests reach deep paths with one thing wrong; sometimes an odd one."""
    return _weighted((3, valid), (1, odd))


VOCAB = len(set(TINY_TEXT)) + 1  # the tiny bundle's characters and <unk>: ids around it are the edge cases
INT32 = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([-1, VOCAB, 2**31 - 1, -(2**31)]),
                  st.integers(-(2**31), 2**31 - 1))
UINT32 = st.one_of(st.integers(0, 20), st.sampled_from([LIMIT, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
INT64 = st.one_of(st.integers(-2, 40), st.sampled_from([2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
UINT64 = st.one_of(st.integers(0, 3), st.integers(0, 2**64 - 1))
# NaN, infinities, -0.0, the smallest subnormal, the largest float32, the limits of temperature and top_p, and all.
FLOAT = _weighted((3, st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-45, 3.4e38, 1e-6, 100.0, 100.01])),
                  (1, st.floats(width=32)))
ODD_TEXT = st.sampled_from(["\x00", "\u200b\u200d", "e\u0301", "\ufeff", "\U0010ffff", "🦊" * 9, "\r\n\t",
                            "Ω≈ç√", "\u202e" + "abc", "a\x00b"])
OVER_LIMIT = st.sampled_from([LIMIT, LIMIT + 1, 4 * LIMIT])
TEXT = st.one_of(st.text(TINY_TEXT, max_size=4), st.text(max_size=12), ODD_TEXT,
                 st.builds(lambda char, size: char * size, st.characters(), OVER_LIMIT))
IDS = st.one_of(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4), st.lists(INT32, max_size=6),
                st.builds(lambda value, size: [value] * size, INT32, OVER_LIMIT))
# Bytes that are not UTF-8: lone continuation, an encoded surrogate, overlong, past U+10FFFF, truncated, mixed.
INVALID_UTF8 = st.sampled_from([b"\xff", b"\x80abc", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xe2\x82",
                                "fine".encode() + b"\xfe" + "🦊".encode()])

# Which session a request names: mostly one of this example's live ones; or a closed one, a bystander's, any string.
SESSION = st.tuples(st.sampled_from(["live"] * 5 + ["closed", "foreign"]), st.integers(0, 7)) | \
    st.tuples(st.just("literal"), st.one_of(TEXT, st.just("")))
VALID_TEXT = st.text(TINY_TEXT, min_size=1, max_size=3)
TOKENS = _mostly(st.one_of(st.fixed_dictionaries({"text": VALID_TEXT}),
                           st.fixed_dictionaries({"token_ids": st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                                                        max_size=3)})),
                 st.fixed_dictionaries({}, optional={"token_ids": IDS, "text": TEXT}))
TOP_K = _mostly(st.integers(0, VOCAB), UINT32)
TEMPERATURE = _mostly(st.sampled_from([0.0, 0.5, 1.0, 2.0]), FLOAT)
STEP = st.tuples(SESSION, st.builds(lambda tokens, extra: {**tokens, **extra}, TOKENS, st.fixed_dictionaries(
    {}, optional={"top_k": TOP_K, "temperature": TEMPERATURE, "expected_position": INT64, "request_id": UINT64})))
WHO = st.sampled_from(["fuzzer"] * 10 + ["none", "wrong"])  # mostly the fuzzer's own token
DEADLINE = st.sampled_from([None] * 14 + [1e-4, 5e-3])


@dataclass(frozen=True)
class Op:
    """One call to make: a method, its request(s), how it is authenticated, cut short or made invalid."""

    method: str
    who: str
    requests: tuple  # (session, fields) pairs, or with `raw` bytes sent as they are
    deadline: float | None = None
    cancel_after: int | None = None  # responses read before cancelling; 0 cancels at once
    repeat: int = 1  # the requests sent this many times over, to make long streams and batches cheaply
    raw: bool = False

    @property
    def only_foreign(self) -> bool:
        """Every request names a bystander's session with the fuzzer's token: the call must not succeed."""
        return self.who == "fuzzer" and not self.raw and all(s and s[0] == "foreign" for s, _ in self.requests)


def _op(method: str, requests, **options) -> st.SearchStrategy[Op]:
    return st.builds(Op, st.just(method), WHO, requests, deadline=DEADLINE, **options)


def _malformed(method: str) -> st.SearchStrategy[bytes]:
    """Bytes for `method` that are not a valid request: random, truncated, or a string field holding invalid UTF-8."""
    strings = [f.number for f in METHODS[method].input_type.fields if f.type == FieldDescriptor.TYPE_STRING]
    in_a_string = st.builds(lambda number, value: bytes([number << 3 | 2, len(value)]) + value,
                            st.sampled_from(strings), INVALID_UTF8) if strings else st.nothing()
    return st.one_of(st.binary(min_size=1, max_size=40), in_a_string, st.just(b"\x0a\x7f"))


def _garbage() -> st.SearchStrategy[Op]:
    return st.sampled_from(sorted(METHODS)).flatmap(
        lambda method: _op(method, st.tuples(_malformed(method)), raw=st.just(True)))


def _oversized() -> st.SearchStrategy[Op]:
    """A request just past the message size limit (a string field 3 of MAX_MESSAGE_BYTES), for any method."""
    payload = b"\x1a" + _varint(MAX_MESSAGE_BYTES) + b"a" * MAX_MESSAGE_BYTES
    return st.sampled_from(sorted(METHODS)).map(lambda method: Op(method, "fuzzer", (payload,), raw=True))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


CREATE = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.just("tiny-lstm"), TEXT), "prompt_text": TEXT, "prompt_token_ids": IDS, "top_k": UINT32,
    "temperature": FLOAT, "ttl_seconds": st.one_of(st.sampled_from([0, 1, 600, 601]), UINT32)})
GENERATE = st.fixed_dictionaries({"max_tokens": st.one_of(st.integers(0, 17), UINT32)}, optional={
    "token_ids": IDS, "text": TEXT, "temperature": FLOAT, "top_k": UINT32, "top_p": FLOAT, "seed": UINT64,
    "stop": st.lists(TEXT, max_size=18), "expected_position": INT64})
STREAM = _op("Stream", st.lists(STEP, min_size=1, max_size=6).map(tuple), repeat=st.integers(40, 100),
             cancel_after=st.sampled_from([None] * 6 + [0, 2, 5]))


# An oversized message costs grpc about 0.1 s to refuse, so it is rare. Streams carry most requests: each
# example has one besides these.
OPS = _weighted(
    (3, _op("CreateSession", st.tuples(st.tuples(st.just(None), CREATE)))),
    (2, _op("GetSession", st.tuples(st.tuples(SESSION, st.just({}))))),
    (2, _op("CloseSession", st.tuples(st.tuples(SESSION, st.just({}))))),
    (4, _op("Step", st.tuples(STEP), cancel_after=st.sampled_from([None, None, 0]))),
    (3, STREAM),
    (2, _op("StepBatch", st.lists(STEP, max_size=6).map(tuple), repeat=st.integers(1, 8))),
    (4, _op("Generate", st.tuples(st.tuples(SESSION, GENERATE)),
            cancel_after=st.one_of(st.none(), st.integers(0, 5)))),
    (1, _op("ListModels", st.just(((None, {}),)))),
    (1, _op("GetModel", st.tuples(st.tuples(st.just(None), st.fixed_dictionaries({"name": st.one_of(
        st.just("tiny-lstm"), TEXT)}))))),
    (3, _garbage()),
    (1, _oversized()),
)


# Accepted means sane -------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, database=None)
@given(top_k=TOP_K, temperature=TEMPERATURE | FLOAT)
def test_a_step_accepted_at_any_top_k_and_temperature_predicts_a_distribution(stub, top_k, temperature):
    """Focused on the numbers a step scales its prediction by, where the big fuzz seldom lands exactly:
    a step is refused INVALID_ARGUMENT, or its top-k are probabilities, most likely first."""
    session_id = stub.CreateSession(pb.CreateSessionRequest(prompt_text="The")).session.session_id
    try:
        prediction = stub.Step(pb.StepRequest(session_id=session_id, text=" q", top_k=top_k,
                                              temperature=temperature)).prediction
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        return
    finally:
        stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    probabilities = list(prediction.probabilities)
    assert len(probabilities) == min(top_k or 5, VOCAB)
    assert all(0.0 <= p <= 1.0 for p in probabilities) and probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 1.0 + 1e-5


# Running them -------------------------------------------------------------------------------------

def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


WHO_METADATA = {"fuzzer": _metadata(FUZZER), "none": (), "wrong": _metadata("not-a-known-token-0000")}


@dataclass
class Fuzzer:
    """Makes the calls of the examples on its own channel and records every status it is answered."""

    channel: grpc.Channel
    foreign: list[str]  # the bystanders' current session ids
    requests: int = 0
    codes: Counter = field(default_factory=Counter)  # (method, code name) -> calls
    live: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._calls = {name: raw_method(self.channel, method) for name, method in METHODS.items()}

    def session_id(self, session: tuple) -> str:
        kind, value = session
        if kind == "literal":
            return value
        pool = {"live": self.live, "closed": self.closed, "foreign": self.foreign}[kind]
        return pool[value % len(pool)] if pool else ""

    def payloads(self, op: Op) -> list[bytes]:
        """The request messages of `op` as bytes: a StepBatch's steps make one message, a Stream's one each."""
        if op.raw:
            return list(op.requests)
        message_class = pb.StepRequest if op.method == "StepBatch" else getattr(pb, METHODS[op.method].input_type.name)
        messages = []
        for session, fields in op.requests * op.repeat:
            message = message_class(**fields)
            if session is not None:
                message.session_id = self.session_id(session)
            messages.append(message)
        if op.method == "StepBatch":
            messages = [pb.StepBatchRequest(steps=messages)]
        return [message.SerializeToString() for message in messages]

    def run(self, op: Op) -> None:
        method, call, payloads = METHODS[op.method], self._calls[op.method], self.payloads(op)
        options = {"metadata": WHO_METADATA[op.who], "timeout": op.deadline or TIMEOUT}
        try:
            if method.client_streaming:
                code = self._read(op, call(self._counted(payloads), **options))
            elif method.server_streaming:
                self.requests += 1
                code = self._read(op, call(payloads[0], **options))
            else:
                self.requests += 1
                code = self._unary(op, call, payloads[0], options)
        except grpc.RpcError as error:
            code = error.code()
        self.codes[op.method, code.name] += 1
        assert code in ALLOWED, f"{op.method} answered {code.name}"
        assert (code == grpc.StatusCode.UNAUTHENTICATED) == (op.who != "fuzzer") or code in ENDED_EARLY, code
        assert not (op.only_foreign and code == grpc.StatusCode.OK and not METHODS[op.method].client_streaming
                    and op.method != "StepBatch"), op  # Stream and StepBatch answer it in-band

    def _counted(self, payloads: list[bytes]) -> Iterator[bytes]:
        for payload in payloads:
            self.requests += 1
            yield payload

    def _unary(self, op: Op, call, payload: bytes, options: dict) -> grpc.StatusCode:
        if op.cancel_after == 0:
            future = call.future(payload, **options)
            if future.cancel():
                return grpc.StatusCode.CANCELLED
            response = future.result()
        else:
            response = call(payload, **options)
        self._check(op, response)
        return grpc.StatusCode.OK

    def _read(self, op: Op, responses) -> grpc.StatusCode:
        """Check each response of a streaming call, cancelling it after `cancel_after`; its status."""
        if op.cancel_after == 0:
            responses.cancel()
        for count, response in enumerate(responses, 1):
            self._check(op, response)
            if count == op.cancel_after:
                responses.cancel()
                break
        return responses.code()

    def _check(self, op: Op, raw: bytes) -> None:
        """Every prediction is a probability, no in-band error is a server fault; track created and closed sessions."""
        response = getattr(pb, METHODS[op.method].output_type.name).FromString(raw)
        for prediction in _predictions(response):
            assert all(0.0 <= p <= 1.0 for p in prediction.probabilities), response
            assert all(math.isfinite(p) or p == -math.inf for p in prediction.logprobs), response
        for error in _in_band_errors(response):
            assert error.code in IN_BAND_ALLOWED, response
        if op.method == "CreateSession":
            self.live.append(response.session.session_id)
        elif op.method == "CloseSession" and op.requests[0][0][0] == "live":
            closed = self.session_id(op.requests[0][0])
            self.live.remove(closed)
            self.closed.append(closed)


def _predictions(response: Message) -> list[pb.Prediction]:
    if isinstance(response, pb.StepBatchResponse):
        return [r.prediction for r in response.results if r.HasField("prediction")]
    if isinstance(response, pb.GenerateResponse):
        return [pb.Prediction(probabilities=[response.probability])]
    return [response.prediction] if hasattr(response, "prediction") and response.HasField("prediction") else []


def _in_band_errors(response: Message) -> list:
    steps = response.results if isinstance(response, pb.StepBatchResponse) else [response]
    return [step.error for step in steps if isinstance(step, pb.StepResponse) and step.HasField("error")]


# Bystanders -----------------------------------------------------------------------------------------

PROMPTS = ("The quick", "brown fox", "0123")


def _prediction(prediction: pb.Prediction) -> tuple:
    return tuple(prediction.token_ids), tuple(prediction.probabilities), tuple(prediction.logprobs)


def bystander_conversation(stub: rnnserve_pb2_grpc.InferenceStub, sessions: list[str]) -> list:
    """Three sessions stepped a character at a time by Step, Stream and StepBatch in turn, then each
    continued by a seeded Generate: the transcript of every prediction and position. `sessions`
    holds their ids while they live, for the fuzzer to try."""
    metadata = _metadata(BYSTANDER)
    created = [stub.CreateSession(pb.CreateSessionRequest(prompt_text=p), metadata=metadata, timeout=TIMEOUT)
               for p in PROMPTS]
    sessions[:] = [c.session.session_id for c in created]
    transcript: list = [_prediction(c.prediction) for c in created]
    for turn, char in enumerate(TINY_TEXT[:30]):
        steps = [pb.StepRequest(session_id=s, text=char, top_k=7, temperature=0.8) for s in sessions]
        if turn % 3 == 0:
            responses = [stub.Step(step, metadata=metadata, timeout=TIMEOUT) for step in steps]
        elif turn % 3 == 1:
            responses = list(stub.Stream(iter(steps), metadata=metadata, timeout=TIMEOUT))
        else:
            responses = stub.StepBatch(pb.StepBatchRequest(steps=steps), metadata=metadata, timeout=TIMEOUT).results
        transcript += [(r.position, r.HasField("error"), _prediction(r.prediction)) for r in responses]
    for session_id in sessions:
        generate = pb.GenerateRequest(session_id=session_id, max_tokens=8, temperature=0.9, top_k=12, seed=7)
        transcript.append([(t.token_id, t.probability, t.position)
                           for t in stub.Generate(generate, metadata=metadata, timeout=TIMEOUT)])
        stub.CloseSession(pb.CloseSessionRequest(session_id=session_id), metadata=metadata, timeout=TIMEOUT)
    return transcript


def converse_until(stop: threading.Event, stub, sessions: list[str]) -> list[list]:
    """The bystander conversation again and again until `stop`; every transcript."""
    transcripts = []
    while not stop.is_set():
        transcripts.append(bystander_conversation(stub, sessions))
    return transcripts


# The test -------------------------------------------------------------------------------------------

@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{BYSTANDER} bystander\n{FUZZER} fuzzer\n")
    return path


def is_server_fault(record: logging.LogRecord) -> bool:
    """An error the server logged: ours (answered INTERNAL) or grpc's for an exception a handler let
    escape. (grpc's record of a final status that found the caller gone is the caller's doing, and
    the server logs it at INFO: `logs.CallerGoneIsNoError`.)"""
    return record.levelno >= logging.ERROR


def _round_of_examples(fuzzer: Fuzzer, caplog) -> Callable[[], None]:
    """EXAMPLES examples, each a few calls and a stream after three fresh sessions to aim at."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(OPS, min_size=1, max_size=8), STREAM)
    def example(ops: list[Op], stream: Op) -> None:
        caplog.clear()
        fuzzer.live.clear()
        fuzzer.closed.clear()
        for _ in range(3):  # sessions to aim at, whose steps can share model calls
            fuzzer.run(Op("CreateSession", "fuzzer", ((None, {"prompt_text": "The"}),)))
        for op in [*ops, stream]:
            fuzzer.run(op)
        faults = [r.getMessage() for r in caplog.records if is_server_fault(r)]
        assert not faults, faults

    return example


def test_fuzzing_every_method_hurts_no_one(start_server, tokens_file, caplog):
    fuzzed = start_server(auth_tokens_file=tokens_file, **LIMITS)
    quiet = start_server(auth_tokens_file=tokens_file, **LIMITS)
    with grpc.insecure_channel(quiet.address) as channel:
        expected = bystander_conversation(rnnserve_pb2_grpc.InferenceStub(channel), [])

    foreign: list[str] = []
    stop = threading.Event()
    with grpc.insecure_channel(fuzzed.address) as bystander_channel, \
            grpc.insecure_channel(fuzzed.address) as fuzz_channel, ThreadPoolExecutor(1) as pool:
        bystanders = pool.submit(converse_until, stop, rnnserve_pb2_grpc.InferenceStub(bystander_channel), foreign)
        fuzzer = Fuzzer(fuzz_channel, foreign)
        try:
            round_of_examples = _round_of_examples(fuzzer, caplog)
            while fuzzer.requests < MIN_REQUESTS:  # how many requests examples make varies a lot
                round_of_examples()
        finally:
            stop.set()
            transcripts = bystanders.result()
        health = health_pb2_grpc.HealthStub(fuzz_channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)

    assert fuzzer.requests >= MIN_REQUESTS, (fuzzer.requests, fuzzer.codes)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert transcripts and all(transcript == expected for transcript in transcripts), len(transcripts)
    logging.getLogger(__name__).info("%d requests, %d bystander conversations: %s", fuzzer.requests,
                                     len(transcripts), sorted(fuzzer.codes.items()))
