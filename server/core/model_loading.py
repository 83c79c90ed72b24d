"""Model versions in and out while serving: from the model repository at start, when a version appears in
it (the repository is polled), and on Admin calls. Each is checked before it serves a single session.

The checks are the bundle's own (`load_bundle`: files whole, graph and manifest consistent) and
the parity self-test (`self_test`); they run in a thread, so serving goes on meanwhile. A version
that fails them is refused with a log line and `rnnserve_model_loads_total{result="refused"}`,
and nothing changes: the versions serving go on serving. The poll remembers a refused version by
its files' sizes and times, so it retries the version once it is replaced, not every few seconds.

What a poll does, Triton's "latest" policy with running sessions kept: a version newer than any
of its model this server has served is loaded and becomes the default for new sessions, and the
version it replaces retires (it serves its running sessions and unloads after the last one
ends; an older version is never loaded back by a poll); a version whose directory is gone
retires too, unless it is a default. Admin calls are exact instead: LoadModel loads,
SetDefaultModel moves a default, UnloadModel retires, each only what it names.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from rnnserve.bundle import Bundle, BundleError, default_repository_path, load_bundle
from rnnserve.repository import ModelRepository, RepositoryError
from rnnserve.server.core.engine import Engine
from rnnserve.server.core.errors import ModelNotFound, ModelRefused, ModelRetiring
from rnnserve.server.core.models import version_order
from rnnserve.server.core.served_model import ServedModel
from rnnserve.server.model.self_test import self_test

log = logging.getLogger(__name__)


def checked_bundle(directory: Path, layout: tuple[str, str] | None = None) -> Bundle:
    """The bundle in `directory` once it has passed every check, its manifest naming the model and version that
    `layout` (a repository's directories) says; BundleError naming the first check that fails."""
    bundle = load_bundle(directory)
    if layout is not None and (bundle.name, bundle.version) != layout:
        raise BundleError(f"{directory}: its manifest names {bundle.name} version {bundle.version}, but the "
                          f"repository's layout says {layout[0]} version {layout[1]}")
    self_test(bundle)
    return bundle


def repository_bundles(path: Path, default_model: str = "") -> list[tuple[Bundle, bool]]:
    """Every version of `path` that passes its checks, each with whether it is its model's default (model.json's
    pin, else the highest), `default_model`'s first (else the first model by name's). A version that fails is
    logged and left out; a model none of whose versions passes raises BundleError, as does a bad layout."""
    repository = ModelRepository.scan(path)
    names = sorted(repository.names, key=lambda name: (name != default_model, name))
    if default_model and default_model not in repository.names:
        raise BundleError(f"{path}: no model {default_model!r} to make the default (it has {names})")
    bundles = []
    for name in names:
        model = repository.model(name)
        passed = []
        for version in model.versions:
            try:
                passed.append((checked_bundle(model.version_path(version), (name, version)),
                               version == model.default_version))
            except BundleError as refusal:
                log.error("model %s version %s not loaded: %s", name, version, refusal)
        if not any(is_default for _, is_default in passed):
            raise BundleError(f"{model.path}: its default version {model.default_version} did not load")
        bundles += passed
    return bundles


def served_repository(model_repository: Path | None, bundle: Path | None) -> Path | None:
    """The repository a server serves, loads from (Admin) and polls: --model-repository, else the shipped one;
    None when --bundle serves one bundle alone.

    The shipped repository is served as any other, so that Admin can load its versions back and a version
    copied into it (`make quantize`) is picked up: the poll only lists its directories, and loads nothing it
    has served already.
    """
    if bundle is not None:
        return None
    return model_repository or default_repository_path()


def startup_bundles(repository: Path | None, bundle: Path | None, default_model: str) -> list[tuple[Bundle, bool]]:
    """What a server serves at start: one bundle (--bundle), else the repository (`served_repository`); each with
    whether it is its model's default version."""
    if bundle is not None:
        return [(checked_bundle(bundle), True)]
    return repository_bundles(repository, default_model)


def _signature(directory: Path) -> tuple:
    """What changes when anything in `directory` is written: each file's name, size and modification time."""
    return tuple(sorted((str(file.relative_to(directory)), stat.st_size, stat.st_mtime_ns)
                        for file in directory.rglob("*") if file.is_file() for stat in (file.stat(),)))


class ModelLoader:
    def __init__(self, engine: Engine, repository: Path | None, poll_seconds: float):
        """`repository`: where LoadModel and the poll look (None: nowhere); `poll_seconds`: 0 never polls."""
        self.engine = engine
        self.repository = repository
        self.poll_seconds = poll_seconds
        self._refused: dict[Path, tuple] = {}  # version directory -> its signature when it was refused
        self._loading = asyncio.Lock()  # one load at a time: each takes a core for its checks
        self._newest: dict[str, tuple] = {}  # model name -> the newest version served so far (version_order)
        for model in engine.models.all():
            self._served(model)

    def _served(self, model: ServedModel) -> None:
        order = version_order(model.version)
        self._newest[model.name] = max(self._newest.get(model.name, order), order)

    async def load(self, name: str, version: str, make_default: bool) -> ServedModel:
        """Load `version` of `name` from the repository and serve it (LoadModel); one already loaded is kept as it
        is (made the default if asked)."""
        if self.repository is None:
            raise ModelRefused(f"{name} version {version}", "this server serves one bundle alone (--bundle): it has "
                                                            "no model repository to load from")
        async with self._loading:
            loaded = self._loaded(name, version)
            if loaded is not None:
                if loaded.retiring:
                    raise ModelRetiring(name, version, self.engine.models.find(name).version)
                if make_default:
                    self.engine.models.set_default(name, version)
                return loaded
            try:
                directory = ModelRepository.scan(self.repository).model(name).version_path(version)
            except RepositoryError as error:
                loaded = [model.describe() for model in self.engine.models.all()]
                raise ModelNotFound(name, loaded, version, f"is not in the model repository: {error}") from None
            return await self._serve(directory, name, version, make_default)

    async def _serve(self, directory: Path, name: str, version: str, make_default: bool) -> ServedModel:
        try:
            bundle = await asyncio.to_thread(checked_bundle, directory, (name, version))
        except BundleError as error:
            self._record(name, version, loaded=False)
            log.error("model %s version %s not loaded: %s; the versions serving go on serving", name, version, error)
            raise ModelRefused(str(directory), str(error)) from None
        model = self.engine.serve_model(bundle, make_default)
        self._record(name, version, loaded=True)
        self._served(model)
        return model

    def _record(self, name: str, version: str, loaded: bool) -> None:
        if self.engine.metrics is not None:
            self.engine.metrics.record_model_load(name, version, loaded)

    def _loaded(self, name: str, version: str) -> ServedModel | None:
        return next((model for model in self.engine.models.all() if (model.name, model.version) == (name, version)),
                    None)

    # Polling the repository --------------------------------------------------------------------

    async def watch(self) -> None:
        """Poll the repository every `poll_seconds` until cancelled."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.poll()
            except RepositoryError as error:
                log.error("cannot read the model repository: %s; polling on", error)

    async def poll(self) -> None:
        """Load what appeared in the repository, retire what it replaced or what left it."""
        found = ModelRepository.scan(self.repository).models
        for name, model in found.items():
            for version in model.versions:
                await self._appeared(name, version, model.version_path(version))
        for served in self.engine.models.all():
            if not served.retiring and served.version not in getattr(found.get(served.name), "versions", ()):
                self._disappeared(served)

    async def _appeared(self, name: str, version: str, directory: Path) -> None:
        if name in self._newest and version_order(version) <= self._newest[name]:
            return  # served already (or older than what was): only an Admin call loads it back
        signature = _signature(directory)
        if self._refused.get(directory) == signature:
            return  # refused as it is: wait until it changes
        models = self.engine.models
        replaced = models.find(name) if name in models.names() else None
        try:
            async with self._loading:
                await self._serve(directory, name, version, make_default=True)
        except ModelRefused:
            self._refused[directory] = signature
            return
        self._refused.pop(directory, None)
        if replaced is not None:
            self.engine.retire_model(replaced.name, replaced.version)

    def _disappeared(self, model: ServedModel) -> None:
        if self.engine.models.is_default(model):
            log.warning("model %s left the repository but is a default: it goes on serving until another version "
                        "is made the default", model.describe())
            return
        log.info("model %s left the repository", model.describe())
        self.engine.retire_model(model.name, model.version)
