"""export_module: modules written here, exported with their proof of parity, served; and what it refuses."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import torch
from serving import Unbatched, assert_prediction
from tiny_models import TinyGRU, TinySSM

from rnnserve.bundle import load_bundle
from rnnserve.export import export_module
from rnnserve.export.module_export import ParityError
from rnnserve.server.model.self_test import self_test
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from rnnserve.vocab import IdVocabulary

VOCAB = IdVocabulary(23)


class HalfStateGRU(TinyGRU):
    """TinyGRU storing its state as float16: half the bytes per session."""

    def state_dtypes(self) -> dict[str, str]:
        return {"h": "float16"}

    def forward(self, tokens, h):
        logits, new = super().forward(tokens, h.float())
        return logits, new.half()


class ForgetfulGRU(TinyGRU):
    """Returns its state but never reads it: every call starts from zeros."""

    def forward(self, tokens, h):
        return super().forward(tokens, torch.zeros_like(h))


class ReshapingGRU(TinyGRU):
    """Declares [1, hidden] but returns its new state as [hidden, 1]: a state that cannot be carried."""

    def forward(self, tokens, h):
        logits, new = super().forward(tokens, h)
        return logits, new.transpose(1, 2).contiguous()


class NoDeclaration(torch.nn.Module):
    def forward(self, tokens, h):
        return tokens, h


def test_a_module_with_a_4d_state_exports_proves_parity_and_writes_format_2(tmp_path):
    torch.manual_seed(0)
    bundle = export_module(TinySSM(len(VOCAB)), VOCAB, tmp_path / "ssm", name="ssm", cell="ssm")
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["vocabulary"] == {"kind": "ids", "size": 23}
    assert manifest["state"] == [{"name": "ssm", "input": "ssm_in", "output": "ssm_out",
                                  "shape": ["batch", 1, 2, 4, 3], "dtype": "float32"}]
    assert (manifest["tokens_input"], manifest["logits_output"]) == ("tokens", "logits")
    parity = manifest["parity"]
    assert parity["steps_vs_prefill"] <= 1e-4 and parity["logits_vs_torch"] <= 1e-4
    assert bundle.state_bytes_per_session == 4 * 1 * 2 * 4 * 3
    self_test(load_bundle(bundle.path))


def test_a_float16_state_is_stored_and_served_as_float16(tmp_path, start_server):
    torch.manual_seed(1)
    bundle = export_module(HalfStateGRU(len(VOCAB)), VOCAB, tmp_path / "half", name="half")
    assert [s.dtype for s in bundle.states] == ["float16"] and bundle.state_bytes_per_session == 2 * 16
    running = start_server(bundle)
    assert running.model.pool.arrays["h"].dtype == np.float16
    reference = Unbatched(bundle)
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        session = stub.CreateSession(pb.CreateSessionRequest(prompt_token_ids=[3, 1, 4])).session.session_id
        reference.feed([3, 1, 4])
        for token in (1, 5, 9):
            answer = stub.Step(pb.StepRequest(session_id=session, token_ids=[token], top_k=5))
            reference.feed([token])
            assert_prediction(answer.prediction, reference)
        model = stub.GetModel(pb.GetModelRequest())
        # an exported session carries its float16 rows as float32, exactly: the import continues bit for bit
        blob = stub.ExportSession(pb.ExportSessionRequest(session_id=session)).state
        imported = stub.ImportSession(pb.ImportSessionRequest(state=blob)).session.session_id
        for token in (2, 7):
            original, copy = (stub.Step(pb.StepRequest(session_id=s, token_ids=[token], top_k=5)).prediction
                              for s in (session, imported))
            assert original == copy
    assert model.state_bytes_per_session == 32


def test_a_module_that_drops_its_state_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ParityError, match="steps_vs_prefill"):
        export_module(ForgetfulGRU(len(VOCAB)), VOCAB, tmp_path / "forgetful", name="forgetful")
    assert not (tmp_path / "forgetful").exists()


def test_a_state_that_comes_back_in_another_shape_is_refused(tmp_path):
    with pytest.raises(ParityError, match=r"state 'h' comes back \[\d+, 16, 1\]"):
        export_module(ReshapingGRU(len(VOCAB)), VOCAB, tmp_path / "reshaping", name="reshaping")
    assert not (tmp_path / "reshaping").exists()


def test_states_come_from_state_shapes_or_the_caller(tmp_path):
    with pytest.raises(TypeError, match="state_shapes"):
        export_module(NoDeclaration(), VOCAB, tmp_path / "none", name="none")
    torch.manual_seed(2)
    bundle = export_module(TinyGRU(len(VOCAB)), VOCAB, tmp_path / "given", name="given", states={"h": (1, 16)})
    assert [(s.name, s.shape) for s in bundle.states] == [("h", (1, 16))]
