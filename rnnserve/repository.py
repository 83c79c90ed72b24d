"""The model repository: several models, each in numbered versions, every version a complete bundle.

The layout is Triton's, so that operators who know one know the other:

    <repository>/<model>/model.json     optional: {"default_version": "1"}
    <repository>/<model>/<version>/     a bundle (manifest.json, model.onnx, states/...)

A version directory's name is a positive integer without leading zeros, so versions order as
numbers ("10" after "9") and no two names mean the same version ("1" and "01"). `model.json`
pins the version served when a request names none; without it, the highest version is served,
so publishing a new version is adding a directory, and pinning is for when the newest is not the
best choice (the int8 copy shipped as version 2 is not the default).

Reading the layout is strict: anything in it that is not a model, a version or model.json is
reported, naming the path, rather than skipped, because a skipped directory is a model or a
version that silently goes unserved (a bundle copied one level too high, a version named "v2").
Hidden entries (".git", ".DS_Store") are the one exception. Only the layout is read here; the
bundles themselves are checked by `rnnserve.bundle.load_bundle` when they are loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rnnserve.bundle import MANIFEST, BundleError

MODEL_CONFIG = "model.json"
_VERSION = re.compile(r"[1-9][0-9]*")


class RepositoryError(BundleError):
    """A repository whose layout cannot be served as it stands; the message names the path at fault.

    A BundleError, so that whoever refuses a bad bundle (at start-up, in the benchmark) refuses a
    bad repository the same way.
    """


def is_version_name(name: str) -> bool:
    """Whether `name` can name a version directory: a positive integer, written without leading zeros."""
    return _VERSION.fullmatch(name) is not None


def read_default_version(model_dir: Path) -> str | None:
    """The version `model_dir/model.json` pins as the default, or None when the model has no model.json.

    Unknown keys are refused too: a misspelt "default-version" would otherwise leave the newest
    version served while the operator believes another is pinned.
    """
    path = Path(model_dir) / MODEL_CONFIG
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RepositoryError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise RepositoryError(f"{path}: must be a JSON object such as {{\"default_version\": \"1\"}}")
    unknown = sorted(set(config) - {"default_version"})
    if unknown:
        raise RepositoryError(f"{path}: unknown keys {unknown} (the one key read is \"default_version\")")
    version = config.get("default_version")
    if version is None:
        return None
    if not isinstance(version, str) or not is_version_name(version):
        raise RepositoryError(f"{path}: default_version must be a version directory's name, a positive integer "
                              f"as a string such as \"1\" (got {version!r})")
    return version


@dataclass(frozen=True)
class RepositoryModel:
    """One model of a repository: its directory, its versions in numeric order, and its pinned default."""

    name: str
    path: Path
    versions: tuple[str, ...]  # ascending as numbers: ("1", "2", "10")
    pinned_version: str | None  # model.json's default_version; None without one

    @property
    def default_version(self) -> str:
        """The version served when a request names none: the pinned one, or else the highest."""
        return self.pinned_version or self.versions[-1]

    def version_path(self, version: str | None = None) -> Path:
        """The bundle directory of `version` (the default version when None)."""
        version = self.default_version if version is None else version
        if version not in self.versions:
            raise RepositoryError(f"{self.path}: model {self.name!r} has no version {version!r} "
                                  f"(it has {list(self.versions)})")
        return self.path / version


def _visible(directory: Path) -> list[Path]:
    """The entries of `directory` except hidden ones, sorted by name so that errors come in a stable order."""
    return sorted(entry for entry in directory.iterdir() if not entry.name.startswith("."))


def scan_model(model_dir: Path) -> RepositoryModel:
    """Read one model directory: its version directories and model.json, nothing else allowed beside them."""
    model_dir = Path(model_dir)
    versions = []
    for entry in _visible(model_dir):
        if entry.name == MODEL_CONFIG and entry.is_file():
            continue
        if entry.name == MANIFEST:
            raise RepositoryError(f"{entry}: a bundle directly in the model directory; a bundle belongs in a "
                                  f"numbered version directory beneath it, such as {model_dir / '1'}")
        if not entry.is_dir():
            raise RepositoryError(f"{entry}: a model directory holds version directories and {MODEL_CONFIG} only")
        if not is_version_name(entry.name):
            raise RepositoryError(f"{entry}: a version directory's name must be a positive integer without "
                                  f"leading zeros, such as {model_dir / '1'}")
        versions.append(entry.name)
    if not versions:
        raise RepositoryError(f"{model_dir}: model {model_dir.name!r} has no version directories "
                              f"(expected {model_dir / '1'} and so on)")
    versions.sort(key=int)
    pinned = read_default_version(model_dir)
    if pinned is not None and pinned not in versions:
        raise RepositoryError(f"{model_dir / MODEL_CONFIG}: default_version {pinned!r} is not among the model's "
                              f"versions {versions}")
    return RepositoryModel(model_dir.name, model_dir, tuple(versions), pinned)


@dataclass(frozen=True)
class ModelRepository:
    """A repository as scanned: its models by name, in name order."""

    path: Path
    models: Mapping[str, RepositoryModel]

    @classmethod
    def scan(cls, path: str | Path) -> ModelRepository:
        """Read the layout of the repository at `path`; RepositoryError naming the first path at fault."""
        path = Path(path)
        if not path.is_dir():
            raise RepositoryError(f"{path}: not a model repository directory")
        models = {}
        for entry in _visible(path):
            if not entry.is_dir():
                raise RepositoryError(f"{entry}: a model repository holds model directories only")
            models[entry.name] = scan_model(entry)
        if not models:
            raise RepositoryError(f"{path}: the model repository holds no models")
        return cls(path, models)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.models)

    def model(self, name: str) -> RepositoryModel:
        """The model called `name`; RepositoryError naming the models there are otherwise."""
        if name not in self.models:
            raise RepositoryError(f"{self.path}: no model {name!r} (the repository has {list(self.models)})")
        return self.models[name]
