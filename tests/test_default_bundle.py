"""The committed default bundle: it loads without torch, and its manifest's figures are measured."""

import json
import subprocess
import sys

import pytest

from rnnserve.bundle import default_bundle_path, load_bundle
from rnnserve.evaluate import evaluate_bundle
from rnnserve.export.corpus import load_corpus


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(default_bundle_path())


def test_manifest_keeps_the_reviewed_figures(bundle):
    manifest = bundle.manifest
    for key in ("val_bpc", "val_top1", "train_seconds"):
        assert isinstance(manifest["metrics"][key], (int, float)), key
    assert manifest["baseline"]["name"] and manifest["baseline"]["val_bpc"] > 0
    assert manifest["metrics"]["val_bpc"] <= 2.00
    assert manifest["metrics"]["val_bpc"] < manifest["baseline"]["val_bpc"]


def test_validation_figure_is_remeasured_from_the_graph(bundle):
    corpus = load_corpus(None)
    score = evaluate_bundle(bundle, bundle.vocab.encode(corpus.val_text))
    assert abs(score.bits_per_char - bundle.manifest["metrics"]["val_bpc"]) <= 0.01
    assert abs(score.top1 - bundle.manifest["metrics"]["val_top1"]) <= 0.01


def test_loading_the_bundle_imports_no_torch():
    code = ("import sys, json; from rnnserve.bundle import load_bundle, default_bundle_path; "
            "b = load_bundle(default_bundle_path()); print(json.dumps('torch' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) is False
