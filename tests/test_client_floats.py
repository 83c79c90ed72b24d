"""The client returns probabilities and logprobs bit for bit as the wire carries them (float32).

Rounding them through a 7-digit string put 26 of 50 values up to 5 ulp off the server's answer.
The wire is read here by hand, not through protobuf, so the comparison does not trust the code
path under test.
"""

import struct

import grpc
import numpy as np

from rnnserve.client import Client
from rnnserve.client.types import GeneratedToken, Prediction
from rnnserve.v1 import rnnserve_pb2 as pb
from serving import raw_call

STEP = pb.DESCRIPTOR.services_by_name["Inference"].methods_by_name["Step"]


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _length_delimited(message: bytes, number: int) -> bytes:
    """The bytes of field `number` (wire type 2) of an encoded message; packed floats and messages are such."""
    at = 0
    while at < len(message):
        tag, at = _varint(message, at)
        wire_type = tag & 7
        if wire_type == 0:
            _, at = _varint(message, at)
            continue
        length, at = _varint(message, at) if wire_type == 2 else ({1: 8, 5: 4}[wire_type], at)
        if tag >> 3 == number and wire_type == 2:
            return message[at:at + length]
        at += length
    raise AssertionError(f"no field {number}")


def _wire_floats(prediction: bytes, number: int) -> list[bytes]:
    packed = _length_delimited(prediction, number)
    return [packed[i:i + 4] for i in range(0, len(packed), 4)]


def _float32_bits(values) -> list[bytes]:
    return [struct.pack("<f", value) for value in values]


def test_a_steps_probabilities_and_logprobs_are_the_wires_bit_for_bit(shared_server):
    """The client's step, and the same step sent again raw (an exact retry, answered from the session's
    record), so both carry the one answer; the client's floats are those bytes, and equal as numbers."""
    with Client(shared_server.address, timeout=10) as client, client.session() as session:
        prediction = session.step("The quick brown", top_k=40)
        retry = pb.StepRequest(session_id=session.id, text="The quick brown", top_k=40, expected_position=0)
        with grpc.insecure_channel(shared_server.address) as channel:
            raw = raw_call(channel, STEP, retry.SerializeToString())
    wire = _length_delimited(raw, 3)
    probabilities, logprobs = _wire_floats(wire, 3), _wire_floats(wire, 4)
    assert len(probabilities) == len(prediction.candidates) == 40
    assert _float32_bits(c.probability for c in prediction.candidates) == probabilities
    assert _float32_bits(c.logprob for c in prediction.candidates) == logprobs
    assert [c.probability for c in prediction.candidates] == [struct.unpack("<f", b)[0] for b in probabilities]


def test_fifty_random_float32s_come_through_unrounded():
    """The issue's repro at the conversion itself: each value read back is the float32 that was sent."""
    values = np.random.default_rng(16).random(50, dtype=np.float32)
    logs = np.log(values)
    prediction = Prediction.from_pb(pb.Prediction.FromString(pb.Prediction(
        token_ids=range(50), texts=["a"] * 50, probabilities=values, logprobs=logs).SerializeToString()), 1)
    assert [c.probability for c in prediction.candidates] == values.tolist()
    assert [c.logprob for c in prediction.candidates] == logs.tolist()
    for value in values:
        token = GeneratedToken.from_pb(pb.GenerateResponse.FromString(
            pb.GenerateResponse(probability=value).SerializeToString()))
        assert struct.pack("<f", token.probability) == value.tobytes()
