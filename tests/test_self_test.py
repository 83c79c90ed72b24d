"""The parity self-test: a sound graph passes, a graph that drops its state passes every file check and fails it."""

import json
import shutil

import pytest

from rnnserve.server.core.model_loading import checked_bundle
from rnnserve.server.model.self_test import ParityFailure, self_test
from serving import stateless_copy


def test_a_sound_graph_of_each_cell_passes(any_bundle):
    self_test(any_bundle)


def test_a_graph_that_drops_its_state_between_calls_is_refused(bundle, tmp_path):
    broken = stateless_copy(bundle, tmp_path / "broken")
    with pytest.raises(ParityFailure, match="one token per call differ from one call"):
        self_test(broken)


def test_a_graph_that_breaks_the_tolerance_its_manifest_states_is_refused(bundle, tmp_path):
    strict = tmp_path / "strict"
    shutil.copytree(bundle.path, strict)
    manifest = json.loads((strict / "manifest.json").read_text())
    manifest["parity"] = {"tolerances": {"steps": -1.0}}  # nothing can be that close
    (strict / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ParityFailure, match="over the bundle's tolerance -1"):
        checked_bundle(strict)


def test_a_version_whose_manifest_disagrees_with_its_directory_is_refused(bundle, tmp_path):
    with pytest.raises(ValueError, match="the repository's layout says tiny-lstm version 7"):
        checked_bundle(bundle.path, ("tiny-lstm", "7"))
