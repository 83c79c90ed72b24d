"""Served predictions equal in-process onnxruntime on the same tokens, however the tokens are fed."""

import grpc
import numpy as np

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import assert_prediction, create


def test_one_at_a_time_prefill_and_mixed_all_equal_onnxruntime(any_bundle, start_server, unbatched):
    rng = np.random.default_rng(len(any_bundle.cell))
    tokens = rng.integers(0, len(any_bundle.vocab), 40).tolist()
    cuts = sorted(rng.choice(np.arange(1, 40), 6, replace=False).tolist())
    chunks = [tokens[a:b] for a, b in zip([0, *cuts], [*cuts, 40])]
    running = start_server(any_bundle)
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        one_at_a_time, prefill, mixed = create(stub), create(stub), create(stub)
        singles = list(stub.Stream(iter([pb.StepRequest(session_id=one_at_a_time, token_ids=[t]) for t in tokens])))
        whole = stub.Step(pb.StepRequest(session_id=prefill, token_ids=tokens))
        pieces = list(stub.Stream(iter([pb.StepRequest(session_id=mixed, token_ids=c) for c in chunks])))
    reference = unbatched(any_bundle)
    for token, single in zip(tokens, singles, strict=True):
        reference.feed([token])
        assert_prediction(single.prediction, reference)
    assert_prediction(whole.prediction, reference)
    reference = unbatched(any_bundle)
    for chunk, piece in zip(chunks, pieces, strict=True):
        reference.feed(chunk)
        assert_prediction(piece.prediction, reference)
    assert singles[-1].position == whole.position == pieces[-1].position == 40
