"""The architectures beyond the recurrent cells: the selective state-space model's scan and graph, and
`rnnserve-train` over each architecture, tokenizer and data set."""

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rnnserve.export.architectures import ARCHITECTURES, build_model
from rnnserve.export.ssm import SelectiveSSMLM, SSMConfig, chunked_scan
from rnnserve.export.train import PRESETS, Trainer

import tiny_models

# The first read of the Bach chorales parses 350 MusicXML files (minutes on a busy 2-core machine; cached after).
pytestmark = pytest.mark.timeout(900)

RECURRENT_OPS = {"LSTM", "GRU", "RNN", "Loop", "Scan"}
# float64 makes the only difference between the chunked scan and the recurrence the order of
# additions: about 1e-15 relative per operation, so 1e-9 leaves room for thousands of them and still
# catches any real error (a wrong decay or a dropped chunk moves the result by 1e-2 or more).
FLOAT64_TOLERANCE = 1e-9
# onnxruntime runs float32 with other kernels and summation orders than torch: the export's own bound.
ONNX_TOLERANCE = 1e-4


def small_ssm(chunk_size: int = 4) -> SelectiveSSMLM:
    """Sizes that keep the test fast, a chunk shorter than the sequences so prefills span several
    chunks and a ragged tail, and step sizes raised so the state decays visibly within a chunk."""
    torch.manual_seed(3)
    model = SelectiveSSMLM(SSMConfig(vocab_size=40, model_size=32, layers=2, state_size=8, head_size=16,
                                     chunk_size=chunk_size)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.dt_bias.add_(2.0)
    return model


def random_state(model, batch: int, dtype=torch.float32) -> list[torch.Tensor]:
    return [0.5 * torch.randn(batch, *shape, dtype=dtype) for shape in model.state_shapes().values()]


def step_by_step(model, tokens: torch.Tensor, state: list[torch.Tensor]):
    logits = []
    for t in range(tokens.shape[1]):
        out, *state = model(tokens[:, t:t + 1], *state)
        logits.append(out)
    return torch.cat(logits, dim=1), state


@pytest.mark.parametrize("length", [1, 3, 4, 9, 17])
@torch.no_grad()
def test_ssm_prefill_equals_single_steps(length):
    """One prefill of T tokens (chunked scan) gives the logits and states of T single steps."""
    model = small_ssm().double()
    tokens = torch.randint(0, 40, (3, length))
    state = random_state(model, 3, torch.float64)
    prefill_logits, *prefill_state = model(tokens, *state)
    stepped_logits, stepped_state = step_by_step(model, tokens, state)
    assert torch.allclose(prefill_logits, stepped_logits, rtol=0, atol=FLOAT64_TOLERANCE)
    for prefill, stepped in zip(prefill_state, stepped_state):
        assert torch.allclose(prefill, stepped, rtol=0, atol=FLOAT64_TOLERANCE)


@torch.no_grad()
def test_chunked_scan_is_the_recurrence():
    """The scan against the recurrence written out: S_t = a_t S_{t-1} + x_t B_t^T, y_t = S_t C_t."""
    batch, time, heads, head_size, n = 2, 11, 3, 4, 5
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, time, heads, head_size, generator=generator, dtype=torch.float64)
    log_a = -torch.rand(batch, time, heads, generator=generator, dtype=torch.float64) * 2
    b, c = (torch.randn(batch, time, n, generator=generator, dtype=torch.float64) for _ in range(2))
    state = torch.randn(batch, heads, head_size, n, generator=generator, dtype=torch.float64)
    expected_y, carried = [], state
    for t in range(time):
        carried = (torch.exp(log_a[:, t])[..., None, None] * carried
                   + x[:, t, :, :, None] * b[:, t, None, None, :])
        expected_y.append(torch.einsum("bhpn,bn->bhp", carried, c[:, t]))
    for chunk_size in (1, 3, 4, 11, 32):
        y, final = chunked_scan(x, log_a, b, c, state, chunk_size)
        assert torch.allclose(y, torch.stack(expected_y, dim=1), rtol=0, atol=FLOAT64_TOLERANCE), chunk_size
        assert torch.allclose(final, carried, rtol=0, atol=FLOAT64_TOLERANCE), chunk_size


def export_graph(model, path: Path) -> Path:
    """Dynamic batch and time, as the bundle export writes every graph."""
    names = list(model.state_shapes())
    inputs = ["tokens", *(f"{n}_in" for n in names)]
    outputs = ["logits", *(f"{n}_out" for n in names)]
    axes = {name: ({0: "batch", 1: "time"} if name in ("tokens", "logits") else {0: "batch"})
            for name in inputs + outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros((2, 3), dtype=torch.int64), *model.initial_state(2)), str(path),
                          input_names=inputs, output_names=outputs, dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    return path


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_ssm_graph_has_no_recurrent_op_and_serves_any_length(tmp_path):
    """No LSTM/GRU/RNN/Loop/Scan in the graph, and the one graph matches torch at any batch and length
    (a single step, a chunk, several chunks with a ragged tail) with its 4-D state."""
    model = small_ssm()
    graph = export_graph(model, tmp_path / "ssm.onnx")
    assert not op_types(graph) & RECURRENT_OPS
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert [len(i.shape) for i in session.get_inputs()] == [2, 4, 5]  # tokens, conv, ssm [B, layers, H, P, N]
    for batch, length in [(1, 1), (3, 4), (5, 13)]:
        tokens = torch.randint(0, 40, (batch, length))
        state = random_state(model, batch)
        with torch.no_grad():
            expected = model(tokens, *state)
        got = session.run(None, {"tokens": tokens.numpy(), "conv_in": state[0].numpy(), "ssm_in": state[1].numpy()})
        for value, reference in zip(got, expected):
            assert value.shape == tuple(reference.shape)
            assert np.abs(value - reference.numpy()).max() < ONNX_TOLERANCE


def test_recurrent_cells_do_show_recurrent_ops(tmp_path):
    """The check above can fail: the GRU's graph holds a GRU op."""
    model = build_model("gru", 20, embed_size=8, hidden_size=8, layers=1, dropout=0.0, state_size=4,
                        head_size=4, chunk_size=4).eval()
    assert "GRU" in op_types(export_graph(model, tmp_path / "gru.onnx"))


def test_every_architecture_declares_its_states():
    """state_shapes() is the contract: the states forward takes and returns, in order, batch-major."""
    for arch in ARCHITECTURES:
        model = build_model(arch, 20, embed_size=8, hidden_size=16, layers=2, dropout=0.0, state_size=4,
                            head_size=8, chunk_size=4).eval()
        shapes = model.state_shapes()
        with torch.no_grad():
            logits, *new = model(torch.zeros((3, 5), dtype=torch.int64), *model.initial_state(3))
        assert logits.shape == (3, 5, 20)
        assert [tuple(s.shape) for s in new] == [(3, *shape) for shape in shapes.values()], arch
    ssm = build_model("ssm", 20, embed_size=8, hidden_size=16, layers=2, dropout=0.0, state_size=4, head_size=8,
                      chunk_size=4)
    assert list(ssm.state_shapes().values()) == [(2, 3, 40), (2, 4, 8, 4)]  # conv: 2*16 + 2*4 channels


def test_ssm_refuses_a_width_that_heads_do_not_divide():
    with pytest.raises(ValueError, match="head_size"):
        SSMConfig(model_size=30, head_size=16)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    """Twelve small 'plays'; the held-out one (the 10th by name) alone holds the word 'zephyrous'."""
    folder = tmp_path_factory.mktemp("corpus")
    for play in range(12):
        extra = "zephyrous zephyrous.\n" * 5 if play == 9 else ""
        (folder / f"play_{play:02d}.txt").write_text(tiny_models.tiny_corpus(seed=play, lines=40) + extra)
    return folder


def tiny_run(tmp_path: Path, corpus: Path | None = None, **overrides) -> Trainer:
    settings = {"max_steps": 12, "eval_every": 6, **overrides}
    config = dataclasses.replace(PRESETS["tiny"], corpus=str(corpus) if corpus else None, **settings)
    trainer = Trainer(config, tmp_path)
    trainer.run()
    return trainer


def test_ssm_trains_and_its_checkpoint_rebuilds(tiny_corpus, tmp_path):
    from rnnserve.export.architectures import rebuild_model

    trainer = tiny_run(tmp_path, tiny_corpus, arch="ssm", hidden_size=32, head_size=16, state_size=8,
                       chunk_size=8)
    assert trainer.history[-1]["train_bpc"] < trainer.history[0]["train_bpc"]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    rebuilt = rebuild_model(ckpt["arch"], ckpt["model_config"])
    rebuilt.load_state_dict(ckpt["model"])
    assert rebuilt.state_shapes() == trainer.model.state_shapes()


def test_bpe_tokenizer_is_trained_on_the_training_split_and_measured_per_character(tiny_corpus, tmp_path):
    from tokenizers import Tokenizer

    trainer = tiny_run(tmp_path, tiny_corpus, tokenizer="bpe", bpe_vocab_size=400)
    vocabulary = trainer.data.vocabulary
    assert vocabulary["kind"] == "tokenizer" and trainer.vocab is None
    tokenizer = Tokenizer.from_str(vocabulary["json"])
    assert tokenizer.get_vocab_size() == trainer.data.vocab_size <= 400  # merges run out on a tiny corpus
    assert "Ġking" in tokenizer.get_vocab()                       # learnt from the training plays
    assert not any("zeph" in piece for piece in tokenizer.get_vocab())  # never saw the held-out play
    val_text = (tiny_corpus / "play_09.txt").read_text()
    assert tokenizer.decode(trainer.val_ids.tolist()) == val_text
    assert trainer.final["val_tokens"] < trainer.final["val_chars"]  # a token holds several characters
    assert trainer.final["val_bpc"] < trainer.final["val_bits_per_token"]


def test_bpe_characters_per_token_add_up_to_the_text():
    """Counting each token's non-continuation bytes gives a run's characters, even where a token ends
    inside a multi-byte character."""
    from rnnserve.export import bpe

    text = "naïve café, Straße — 東京の夜 🌙.\n" * 20
    tokenizer = bpe.train_byte_level_bpe("plain words only\n" * 50, vocab_size=280)
    ids = bpe.encode(tokenizer, text)
    assert tokenizer.decode(ids.tolist()) == text
    assert int(bpe.characters_per_token(tokenizer)[ids].sum()) == len(text)


def test_unknown_choices_are_refused_naming_the_flag(capsys):
    from rnnserve.export.train import parse_args

    for flag, value in [("--arch", "transformer"), ("--tokenizer", "words"), ("--dataset", "mnist")]:
        with pytest.raises(SystemExit):
            parse_args([flag, value])
        assert flag in capsys.readouterr().err
    assert parse_args(["--cell", "gru"]).arch == "gru"  # the README's older spelling still works


def test_chorales_are_ids_without_text_split_by_chorale():
    from rnnserve.export import chorales

    data = chorales.load_chorales()
    assert data.vocabulary["kind"] == "ids" and data.characters is None and data.unit == "token"
    files, held = data.description["files"], len(data.description["validation_files"])
    assert files > 300 and held == files // 10                    # every 10th chorale held out
    for ids in (data.train_ids, data.val_ids):
        assert ids.min() >= 0 and ids.max() < chorales.VOCAB_SIZE and ids[-1] == chorales.END
    assert (data.train_ids == chorales.END).sum() == files - held and (data.val_ids == chorales.END).sum() == held
    # Sopranos sing between about C4 (60) and A5 (81): the ids are real pitches, not noise.
    pitches = data.train_ids[data.train_ids >= chorales.FIRST_PITCH] - chorales.FIRST_PITCH
    assert 55 <= np.percentile(pitches, 1) and np.percentile(pitches, 99) <= 84


def test_chorale_model_trains_on_ids(tmp_path):
    trainer = tiny_run(tmp_path, dataset="bach-chorales", batch_size=8, seq_len=16, max_steps=30, eval_every=15)
    assert trainer.vocab is None and "val_bpc" not in trainer.final  # no text, so no bits per character
    # A uniform guess over the 130 ids is 7.02 bits; a few steps of next-note training beat it.
    assert trainer.final["val_bits_per_token"] < np.log2(130)
    assert trainer.final["val_perplexity"] == pytest.approx(2 ** trainer.final["val_bits_per_token"], rel=1e-3)


# Trained, exported by rnnserve-export, served ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported_runs(tiny_corpus, tmp_path_factory) -> dict:
    """One tiny run of each new kind, exported by `rnnserve-export` as a user runs it: name -> bundle."""
    from rnnserve.bundle import load_bundle
    from rnnserve.export.export import main as export_main

    runs = {"ssm": {"arch": "ssm", "hidden_size": 32, "head_size": 16, "state_size": 8, "chunk_size": 8},
            "bpe": {"tokenizer": "bpe", "bpe_vocab_size": 400},
            "chorales": {"dataset": "bach-chorales", "batch_size": 8, "seq_len": 16}}
    bundles = {}
    for name, overrides in runs.items():
        run_dir = tmp_path_factory.mktemp(f"run-{name}")
        tiny_run(run_dir, None if name == "chorales" else tiny_corpus, max_steps=6, eval_every=6, **overrides)
        out = tmp_path_factory.mktemp("bundles") / name
        export_main(["--run", str(run_dir), "--out", str(out), "--no-baseline"])
        bundles[name] = load_bundle(out)
    return bundles


def test_exported_manifests_measure_each_kind_in_its_unit(exported_runs):
    ssm, bpe, chorales = exported_runs["ssm"], exported_runs["bpe"], exported_runs["chorales"]
    assert ssm.manifest["cell"] == "ssm" and [len(s.shape) for s in ssm.states] == [3, 4]  # conv, ssm (without batch)
    metrics = bpe.manifest["metrics"]
    assert bpe.vocab.kind == "tokenizer" and metrics["val_tokens"] < metrics["val_chars"]
    assert chorales.vocab.kind == "ids" and "val_bpc" not in chorales.manifest["metrics"]
    assert chorales.manifest["training"]["command"].startswith("rnnserve-train --arch gru --dataset bach-chorales")
    for bundle in exported_runs.values():
        assert bundle.manifest["parity"]["steps_vs_prefill"] <= bundle.manifest["parity"]["tolerances"]["steps"]
        assert {"step_us_batch1", "step_us_batch256"} <= set(bundle.manifest["serving_cost"])


@pytest.mark.parametrize("kind", ["ssm", "bpe", "chorales"])
def test_trained_models_serve_what_onnxruntime_computes(exported_runs, kind):
    """A served session of each trained kind predicts what the graph predicts with the state carried by hand;
    the id-only model refuses text, naming the field."""
    import grpc
    from serving import RunningServer, Unbatched, assert_fails, create

    from rnnserve.server.settings import Settings
    from rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.v1 import rnnserve_pb2_grpc

    bundle = exported_runs[kind]
    prompt = [5, 9, 2, 7, 7, 3]
    reference = Unbatched(bundle)
    reference.feed(prompt[:-1])
    reference.feed(prompt[-1:])
    expected_ids, expected_probabilities = reference.top_k(5)
    running = RunningServer(bundle, Settings(listen="127.0.0.1:0"))
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = rnnserve_pb2_grpc.InferenceStub(channel)
            session = create(stub, prompt_token_ids=prompt[:-1])
            answer = stub.Step(pb.StepRequest(session_id=session, token_ids=prompt[-1:], top_k=5))
            assert list(answer.prediction.token_ids) == expected_ids
            np.testing.assert_allclose(answer.prediction.probabilities, expected_probabilities, atol=1e-5)
            if kind == "chorales":
                assert_fails(lambda: stub.Step(pb.StepRequest(session_id=session, text="C4")),
                             grpc.StatusCode.INVALID_ARGUMENT, field="text")
            else:
                stub.Step(pb.StepRequest(session_id=session, text="the king"))
    finally:
        running.stop()
