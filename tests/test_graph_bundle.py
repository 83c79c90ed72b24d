"""rnnserve-bundle: graphs written here with onnx.helper, wrapped and served; and every graph it refuses.

The graph is a bag-of-tokens model: its state counts the tokens read so far, its logits are a random
projection of the counts after each token. Prefix sums (CumSum) make a prefill equal T single steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from serving import Unbatched, assert_prediction
from tiny_models import tiny_corpus, train_tokenizer

from rnnserve.export.graph_bundle import main
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc

VOCAB = 40


def counting_graph(path: Path, vocab: int = VOCAB, *, reads_state: bool = True, out_shape: list | None = None,
                   tokens: str = "ids", logits: str = "scores") -> Path:
    """tokens [batch, time] int64, count_in [batch, vocab] -> logits [batch, time, vocab], count_out [batch, vocab]."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("OneHot", [tokens, "depth", "one_hot_values"], ["one_hot"], axis=-1),  # [B, T, V]
             helper.make_node("CumSum", ["one_hot", "time_axis"], ["prefix"]),  # counts after each token
             helper.make_node("Unsqueeze", ["count_in", "time_axis"], ["carried"]),  # [B, 1, V]
             helper.make_node("Add", ["prefix", "carried"] if reads_state else ["prefix", "zero"], ["total"]),
             helper.make_node("MatMul", ["total", "projection"], [logits]),
             helper.make_node("ReduceSum", ["one_hot", "time_axis"], ["read"], keepdims=0),
             helper.make_node("Add", ["read", "count_in"], ["count_out"])]
    initializers = [helper.make_tensor("depth", TensorProto.INT64, [], [vocab]),
                    helper.make_tensor("one_hot_values", TensorProto.FLOAT, [2], [0.0, 1.0]),
                    helper.make_tensor("time_axis", TensorProto.INT64, [1], [1]),
                    helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                    helper.make_tensor("projection", TensorProto.FLOAT, [vocab, vocab],
                                       (0.3 * rng.standard_normal(vocab * vocab)).tolist())]
    inputs = [helper.make_tensor_value_info(tokens, TensorProto.INT64, ["batch", "time"]),
              helper.make_tensor_value_info("count_in", TensorProto.FLOAT, ["batch", vocab])]
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", "time", vocab]),
               helper.make_tensor_value_info("count_out", TensorProto.FLOAT, out_shape or ["batch", vocab])]
    graph = helper.make_graph(nodes, "counting", inputs, outputs, initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def bundle_command(graph: Path, out: Path, *vocabulary: str) -> list[str]:
    return ["--graph", str(graph), *vocabulary, "--state", "count_in:count_out", "--tokens", "ids",
            "--logits", "scores", "--out", str(out), "--name", "counting", "--cell", "bag-of-tokens"]


def test_a_graph_made_elsewhere_becomes_a_bundle_that_serves(tmp_path, start_server, capsys):
    graph = counting_graph(tmp_path / "counting.onnx")
    main(bundle_command(graph, tmp_path / "bundle", "--vocab-size", str(VOCAB)))
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["state"] == [{"name": "count", "input": "count_in", "output": "count_out",
                                  "shape": ["batch", VOCAB], "dtype": "float32"}]
    assert (manifest["tokens_input"], manifest["logits_output"], manifest["vocabulary"]) == (
        "ids", "scores", {"kind": "ids", "size": VOCAB})
    from rnnserve.bundle import load_bundle

    bundle = load_bundle(tmp_path / "bundle")
    running = start_server(bundle)
    reference = Unbatched(bundle)
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        created = stub.CreateSession(pb.CreateSessionRequest(prompt_token_ids=[5, 6, 7], top_k=5))
        reference.feed([5, 6, 7])
        assert_prediction(created.prediction, reference)
        answer = stub.Step(pb.StepRequest(session_id=created.session.session_id, token_ids=[8], top_k=5))
        reference.feed([8])
        assert_prediction(answer.prediction, reference)


def test_a_tokenizer_is_shipped_in_the_bundle(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(train_tokenizer(tiny_corpus()))
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    graph = counting_graph(tmp_path / "counting.onnx", vocab=len(vocab))
    main(bundle_command(graph, tmp_path / "bundle", "--tokenizer", str(tokenizer)))
    from rnnserve.bundle import load_bundle

    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.vocab.kind == "tokenizer" and (tmp_path / "bundle" / "tokenizer.json").read_text() == tokenizer.read_text()
    assert bundle.vocab.decode(bundle.vocab.encode("café 東京")) == "café 東京"


def refusal(tmp_path: Path, argv: list[str]) -> str:
    """The message rnnserve-bundle exits with (the interpreter prints it on stderr)."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert not (tmp_path / "bundle").exists()  # nothing written
    return str(caught.value.code)


def test_a_graph_that_drops_its_state_is_refused_by_the_self_test(tmp_path):
    graph = counting_graph(tmp_path / "forgetful.onnx", reads_state=False)
    error = refusal(tmp_path, bundle_command(graph, tmp_path / "bundle", "--vocab-size", str(VOCAB)))
    assert "one token per call differ from one call" in error


@pytest.mark.parametrize("case", ["vocabulary", "state", "tokens", "unnamed input"])
def test_shapes_and_names_that_disagree_are_refused_naming_them(tmp_path, case):
    graph = counting_graph(tmp_path / "g.onnx", out_shape=["batch", VOCAB + 1] if case == "state" else None)
    argv = bundle_command(graph, tmp_path / "bundle", "--vocab-size", str(VOCAB + 3 if case == "vocabulary" else VOCAB))
    if case == "tokens":
        argv[argv.index("--tokens") + 1] = "tokens"
    if case == "unnamed input":
        argv[argv.index("--state") + 1] = "count_out:count_out"
    error = refusal(tmp_path, argv)
    expected = {"vocabulary": "'scores' has shape ['batch', 'time', 40] in the graph, the manifest says ['batch', *['time', 43]]",
                "state": "count_in is float32 ['batch', 40] but count_out is float32 ['batch', 41]",
                "tokens": "inputs ['ids'] are neither --tokens nor a --state",
                "unnamed input": "inputs ['count_in'] are neither --tokens nor a --state"}[case]
    assert expected in error
