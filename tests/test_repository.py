"""The model repository's layout as read from real directories: models, numbered versions, model.json."""

from pathlib import Path

import pytest

from rnnserve.bundle import BundleError
from rnnserve.repository import (ModelRepository, RepositoryError, is_version_name, read_default_version,
                                 scan_model)


def make(root: Path, *dirs: str, files: dict[str, str] | None = None) -> Path:
    """Directories and files under `root`, paths relative to it. Bundles are not read here: empty versions do."""
    for directory in dirs:
        (root / directory).mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_models_and_versions_in_numeric_order_with_the_pinned_default(tmp_path):
    make(tmp_path, "lstm/1", "lstm/2", "lstm/10", "lstm/9", "gru/3",
         files={"lstm/model.json": '{"default_version": "2"}'})
    repository = ModelRepository.scan(tmp_path)
    assert repository.names == ("gru", "lstm")
    lstm = repository.model("lstm")
    assert lstm.versions == ("1", "2", "9", "10")
    assert lstm.pinned_version == "2" and lstm.default_version == "2"
    assert lstm.version_path() == tmp_path / "lstm" / "2"
    assert lstm.version_path("10") == tmp_path / "lstm" / "10"


def test_without_model_json_the_highest_version_is_the_default(tmp_path):
    make(tmp_path, "gru/2", "gru/10")
    gru = ModelRepository.scan(tmp_path).model("gru")
    assert gru.pinned_version is None and gru.default_version == "10"
    assert read_default_version(tmp_path / "gru") is None


def test_a_model_json_without_default_version_pins_nothing(tmp_path):
    make(tmp_path, "gru/1", "gru/2", files={"gru/model.json": "{}"})
    assert ModelRepository.scan(tmp_path).model("gru").default_version == "2"


def test_hidden_entries_are_skipped_at_every_level(tmp_path):
    make(tmp_path, "lstm/1", ".git/objects", "lstm/.cache",
         files={".DS_Store": "", "lstm/.DS_Store": "", "lstm/1/.keep": ""})
    repository = ModelRepository.scan(tmp_path)
    assert repository.names == ("lstm",) and repository.model("lstm").versions == ("1",)


@pytest.mark.parametrize("name", ["v2", "latest", "0", "01", "-1", "1.0", "２"])
def test_a_version_directory_not_named_by_a_positive_integer_is_reported(tmp_path, name):
    make(tmp_path, "lstm/1", f"lstm/{name}")
    with pytest.raises(RepositoryError, match="positive integer") as raised:
        ModelRepository.scan(tmp_path)
    assert str(tmp_path / "lstm" / name) in str(raised.value)


def test_version_names():
    assert all(is_version_name(n) for n in ("1", "2", "10", "123456789"))
    assert not any(is_version_name(n) for n in ("", "0", "00", "01", "+1", "1 ", "1e3", "٣"))


@pytest.mark.parametrize("text, complaint", [
    ("{not json", "not readable JSON"),
    ('["1"]', "must be a JSON object"),
    ('{"default_version": 1}', "positive integer as a string"),
    ('{"default_version": "v1"}', "positive integer as a string"),
    ('{"default_version": "01"}', "positive integer as a string"),
    ('{"default-version": "1"}', "unknown keys"),
    ('{"default_version": "7"}', "not among the model's versions"),
])
def test_a_malformed_model_json_is_reported_naming_it(tmp_path, text, complaint):
    make(tmp_path, "lstm/1", files={"lstm/model.json": text})
    with pytest.raises(RepositoryError, match=complaint) as raised:
        ModelRepository.scan(tmp_path)
    assert str(tmp_path / "lstm" / "model.json") in str(raised.value)


def test_a_bundle_one_level_too_high_is_reported_with_where_it_belongs(tmp_path):
    make(tmp_path, "lstm", files={"lstm/manifest.json": "{}", "lstm/model.onnx": ""})
    with pytest.raises(RepositoryError, match="numbered version directory") as raised:
        scan_model(tmp_path / "lstm")
    assert str(tmp_path / "lstm" / "1") in str(raised.value)


@pytest.mark.parametrize("layout, dirs, files, at_fault", [
    ("a file among the models", ["lstm/1"], {"README.md": ""}, "README.md"),
    ("a file among the versions", ["lstm/1"], {"lstm/notes.txt": ""}, "lstm/notes.txt"),
    ("a model with no versions", ["lstm/1", "gru"], {}, "gru"),
    ("an empty repository", [], {}, ""),
])
def test_a_layout_that_cannot_be_served_is_reported_naming_the_path(tmp_path, layout, dirs, files, at_fault):
    make(tmp_path, *dirs, files=files)
    with pytest.raises(RepositoryError) as raised:
        ModelRepository.scan(tmp_path)
    assert str(tmp_path / at_fault).rstrip("/") in str(raised.value), layout


def test_a_missing_repository_model_or_version_is_reported(tmp_path):
    with pytest.raises(RepositoryError, match="not a model repository directory"):
        ModelRepository.scan(tmp_path / "absent")
    make(tmp_path, "lstm/1")
    repository = ModelRepository.scan(tmp_path)
    with pytest.raises(RepositoryError, match=r"no model 'gru' \(the repository has \['lstm'\]\)"):
        repository.model("gru")
    with pytest.raises(RepositoryError, match=r"no version '2' \(it has \['1'\]\)"):
        repository.model("lstm").version_path("2")


def test_repository_errors_are_bundle_errors():
    # Whoever refuses a bundle that must not be served refuses a repository that cannot be, without a new clause.
    assert issubclass(RepositoryError, BundleError)

