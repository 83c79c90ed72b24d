"""The shipped repository's second model: a GRU over a byte-level BPE, trained by `rnnserve-train --preset
bpe-gru` and chosen by name beside the default LSTM, served end to end from the repository as shipped."""

import grpc
import numpy as np
import pytest
from serving import RunningServer, Unbatched

from rnnserve.bundle import DEFAULT_MODEL, default_repository_path, load_bundle
from rnnserve.repository import ModelRepository
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc

SUBWORD_MODEL = "shakespeare-subword-gru"
PROMPT = "ROMEO.\nBut soft, what light through yonder window"


@pytest.fixture(scope="module")
def subword_bundle():
    return load_bundle(ModelRepository.scan(default_repository_path()).model(SUBWORD_MODEL).version_path())


@pytest.fixture(scope="module")
def shipped_server():
    running = RunningServer(None, Settings(listen="127.0.0.1:0"))
    yield running
    running.stop()


def test_the_subword_model_ships_its_tokenizer_and_its_measured_figures(subword_bundle):
    manifest = subword_bundle.manifest
    assert subword_bundle.vocab.kind == "tokenizer" and len(subword_bundle.vocab) == 4096
    assert manifest["cell"] == "gru" and manifest["training"]["command"] == "rnnserve-train --preset bpe-gru"
    metrics = manifest["metrics"]
    # Per character on the shipped LSTM's validation plays, though the model reads about 3 characters a token.
    assert metrics["val_chars"] > 2.5 * metrics["val_tokens"] and 0 < metrics["val_bpc"] < metrics["val_bits_per_token"]
    assert (subword_bundle.path / "tokenizer.json").stat().st_size > 0
    text = "Wherefore art thou, señor? 東京"
    assert subword_bundle.vocab.decode(subword_bundle.vocab.encode(text).tolist()) == text  # byte-level: exact


def test_the_repository_serves_both_models_by_name_the_lstm_by_default(shipped_server, subword_bundle):
    with grpc.insecure_channel(shipped_server.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        names = [model.name for model in stub.ListModels(pb.ListModelsRequest()).models]
        assert names[0] == DEFAULT_MODEL and SUBWORD_MODEL in names
        default = stub.CreateSession(pb.CreateSessionRequest(prompt_text="ROMEO.")).session
        assert default.model == DEFAULT_MODEL
        created = stub.CreateSession(pb.CreateSessionRequest(model=SUBWORD_MODEL, prompt_text=PROMPT[:20]))
        assert created.session.model == SUBWORD_MODEL
        answer = stub.Step(pb.StepRequest(session_id=created.session.session_id, text=PROMPT[20:], top_k=5))
    reference = Unbatched(subword_bundle)
    reference.feed(subword_bundle.vocab.encode(PROMPT[:20]))
    reference.feed(subword_bundle.vocab.encode(PROMPT[20:]))
    expected_ids, expected_probabilities = reference.top_k(5)
    assert list(answer.prediction.token_ids) == expected_ids
    np.testing.assert_allclose(answer.prediction.probabilities, expected_probabilities, atol=1e-5)
