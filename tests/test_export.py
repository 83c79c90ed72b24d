"""Train, export and load on a tiny corpus: parity, determinism, and every broken bundle refused."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rnnserve.bundle import BundleError, load_bundle
from rnnserve.evaluate import evaluate_bundle
from rnnserve.export import export as exporter
from rnnserve.export import module_export
from rnnserve.export.model import ModelConfig, RecurrentLM
from rnnserve.export.train import PRESETS, Trainer

WORDS = "the king queen crown sword night day love death speak hear lord lady good ill".split()


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    """Twelve small 'plays' of seeded pseudo-verse: enough to split by file and to learn a little."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(7)
    for play in range(12):
        lines = (" ".join(rng.choice(WORDS, size=6)) + ".\n" for _ in range(40))
        (folder / f"play_{play:02d}.txt").write_text("".join(lines))
    return folder


def tiny_config(corpus: Path, cell: str):
    return dataclasses.replace(PRESETS["tiny"], arch=cell, corpus=str(corpus), max_steps=12, eval_every=6)


@pytest.fixture(scope="module", params=["rnn", "gru", "lstm"])
def trained(request, tiny_corpus, tmp_path_factory) -> Trainer:
    trainer = Trainer(tiny_config(tiny_corpus, request.param), tmp_path_factory.mktemp(f"run-{request.param}"))
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / trained.config.arch
    return exporter.export_bundle(trained.model, trained.vocab, out, name=f"tiny-{trained.config.arch}",
                                  val_ids=trained.val_ids)


def test_training_learns_something(trained):
    first, last = trained.history[0], trained.history[-1]
    assert last["step"] == 12 and (trained.out_dir / "checkpoint.pt").exists() and (trained.out_dir / "loss.png").exists()
    assert last["train_bpc"] < first["train_bpc"]


def test_export_proves_parity_and_measures_validation(exported, trained):
    parity = exported.manifest["parity"]
    assert parity["logits_vs_torch"] <= 1e-4 and parity["steps_vs_prefill"] <= 1e-4
    assert parity["state_vs_torch"] <= 1e-5
    assert exported.cell == trained.config.arch
    assert [s.name for s in exported.states] == list(trained.model.config.state_names)
    # The manifest's figure is the graph's own, re-measured here independently of export.
    assert abs(evaluate_bundle(exported, trained.val_ids).bits_per_char - exported.manifest["metrics"]["val_bpc"]) < 1e-3


def test_graph_serves_any_batch_and_length(exported):
    session = ort.InferenceSession(str(exported.graph_path))
    for batch, length in [(1, 1), (5, 1), (3, 17)]:
        feed = {"tokens": np.ones((batch, length), np.int64),
                **{s.input: np.zeros((batch, *s.row_shape), np.float32) for s in exported.states}}
        logits, *states = session.run(None, feed)
        assert logits.shape == (batch, length, len(exported.vocab))
        assert all(s.shape == (batch, *spec.row_shape) for s, spec in zip(states, exported.states))


def test_same_seed_gives_same_weights(tiny_corpus, tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = Trainer(tiny_config(tiny_corpus, "gru"), tmp_path / name)
        trainer.run()
        runs.append(trainer.model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_resume_continues_from_checkpoint(tiny_corpus, tmp_path):
    config = tiny_config(tiny_corpus, "gru")
    first = Trainer(dataclasses.replace(config, max_steps=6), tmp_path)
    first.run()
    resumed = Trainer(config, tmp_path)
    resumed.resume(tmp_path / "checkpoint.pt")
    assert resumed.step == 6
    resumed.run()
    assert resumed.step == 12 and [h["step"] for h in resumed.history] == [6, 12]


def test_parity_failure_stops_export_with_numbers(tmp_path):
    model = RecurrentLM(ModelConfig("gru", 10, 4, 8, 1)).eval()
    graph = tmp_path / "model.onnx"
    specs = module_export.state_specs(model, {"h": (1, 8)})
    module_export.write_graph(model, specs, graph)
    with torch.no_grad():
        model.head.bias += 0.01  # the graph no longer matches the module
    with pytest.raises(module_export.ParityError, match="logits_vs_torch"):
        module_export.check_parity(model, specs, 10, graph)


# -- broken bundles ---------------------------------------------------------------------------

def broken_copy(bundle, tmp_path: Path, edit) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(bundle.path, target)
    edit(target)
    return target


def edit_manifest(change):
    def edit(path: Path):
        manifest = json.loads((path / "manifest.json").read_text())
        change(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
    return edit


BROKEN = {
    "no manifest": (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    "bad json": (lambda p: (p / "manifest.json").write_text("{"), "not valid JSON"),
    "no graph": (lambda p: (p / "model.onnx").unlink(), "no model.onnx"),
    "corrupt graph": (lambda p: (p / "model.onnx").write_bytes(b"garbage"), "sha256"),
    "future format": (edit_manifest(lambda m: m.update(format_version=99)), "format_version 99"),
    "missing key": (edit_manifest(lambda m: m.pop("cell")), "lacks cell"),
    "vocab size": (edit_manifest(lambda m: m["sizes"].update(vocab_size=3)), "vocab_size"),
    "vocab vs logits": (edit_manifest(lambda m: (m["vocabulary"]["tokens"].append("\u2603"),
                                                 m["sizes"].update(vocab_size=m["sizes"]["vocab_size"] + 1))), "'logits'"),
    "state name": (edit_manifest(lambda m: m["state"][0].update(input="hidden_in")), "hidden_in"),
    "state shape": (edit_manifest(lambda m: m["state"][0].update(shape=["batch", 9, 9])), "shape"),
    "no unknown token": (edit_manifest(lambda m: m["vocabulary"]["tokens"].pop(0)), "vocabulary"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_bundle_is_refused(kind, exported, tmp_path):
    edit, message = BROKEN[kind]
    with pytest.raises(BundleError, match=message):
        load_bundle(broken_copy(exported, tmp_path, edit))
