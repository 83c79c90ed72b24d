"""The models a server serves: every loaded version of each, each model's default version, and the
server's default model.

A request names a model (or none: the server's default) and optionally a version (or none: that
model's default). A default changes for new sessions only: a session keeps the version it began
with until it ends. A version asked to unload while sessions run on it retires: it takes no new
sessions, serves its running ones, and is unloaded by `on_unloaded` after the last one ends.
"""

from __future__ import annotations

from collections.abc import Callable

from rnnserve.server.core.errors import ModelIsDefault, ModelNotFound, ModelRetiring
from rnnserve.server.core.served_model import ServedModel
from rnnserve.server.store.snapshot import ModelIdentity


def version_order(version: str) -> tuple[int, int | str]:
    """Numeric versions in numeric order (Triton's "latest" is the highest), after any that are not numbers."""
    return (1, int(version)) if version.isdecimal() else (0, version)


class ModelRegistry:
    def __init__(self, on_unloaded: Callable[[ServedModel], None]):
        self._versions: dict[str, dict[str, ServedModel]] = {}  # name -> version -> model
        self._defaults: dict[str, str] = {}  # name -> its default version
        self.default_name = ""  # the server's default model; "" until the first is added
        self._on_unloaded = on_unloaded  # told when a version leaves, at once or once retired

    def __len__(self) -> int:
        return sum(len(versions) for versions in self._versions.values())

    def get(self, name: str = "", version: str = "") -> ServedModel:
        """The version that new sessions of `name` ("" for the server's default) get: `version`, or the default."""
        model = self.find(name, version)
        if model.retiring:
            raise ModelRetiring(model.name, model.version, self._defaults[model.name])
        return model

    def find(self, name: str = "", version: str = "") -> ServedModel:
        """The loaded `version` of `name` ("" for the server's default), retiring or not; "" for its default."""
        versions = self._versions.get(name or self.default_name)
        if versions is None:
            raise ModelNotFound(name, self.names())
        name = name or self.default_name
        model = versions.get(version or self._defaults[name])
        if model is None:
            raise ModelNotFound(name, [f"{name} {loaded}" for loaded in self._sorted(name)], version)
        return model

    def names(self) -> list[str]:
        """Loaded model names, the server's default first."""
        return sorted(self._versions, key=lambda name: (name != self.default_name, name))

    def all(self) -> list[ServedModel]:
        """Every loaded version, retiring ones included: models as `names`, each one's versions in order."""
        return [self._versions[name][version] for name in self.names() for version in self._sorted(name)]

    def with_identity(self, identity: ModelIdentity) -> ServedModel | None:
        """The version that takes new sessions and can continue a state of `identity` (an import, a restore): the
        same name and version if loaded, else another name for the same graph (its sha256); None when none is."""
        same_graph = [model for model in self.all() if model.identity.sha256 == identity.sha256 and not model.retiring]
        return next((model for model in same_graph if model.identity == identity), None) or next(iter(same_graph),
                                                                                                  None)

    def is_default(self, model: ServedModel) -> bool:
        """Whether new sessions naming `model`'s name and no version get it."""
        return self._defaults.get(model.name) == model.version

    def is_server_default(self, model: ServedModel) -> bool:
        """Whether new sessions naming no model get it."""
        return model.name == self.default_name and self.is_default(model)

    def add(self, model: ServedModel, make_default: bool) -> None:
        """Add a loaded (started) version; it is its model's default if asked, or if it is the model's first."""
        versions = self._versions.setdefault(model.name, {})
        if model.version in versions:
            raise ValueError(f"{model.describe()} is loaded already")
        versions[model.version] = model
        self.default_name = self.default_name or model.name
        if make_default or model.name not in self._defaults:
            self._set_default(model)
        elif model.events is not None:
            model.events.record_default(False)

    def set_default(self, name: str, version: str, server_default: bool = False) -> ServedModel:
        """Make `version` the default of `name` for new sessions; with `server_default`, `name` the server's too."""
        model = self.get(name, version)
        self._set_default(model)
        if server_default:
            self.default_name = model.name
        return model

    def _set_default(self, model: ServedModel) -> None:
        previous = self._versions[model.name].get(self._defaults.get(model.name, ""))
        self._defaults[model.name] = model.version
        for version in (previous, model):
            if version is not None and version.events is not None:
                version.events.record_default(version is model)

    def retire(self, name: str, version: str) -> ServedModel:
        """Unload `version` of `name` now if no session runs on it, else once its last session ends.

        A default version is refused (ModelIsDefault): new sessions would have nowhere to go.
        """
        versions = self._versions.get(name)
        model = None if versions is None else versions.get(version)
        if model is None:
            raise ModelNotFound(name, self.names(), version)
        if self._defaults[name] == version and (len(versions) > 1 or name == self.default_name):
            raise ModelIsDefault(name, version)
        if not model.retiring:
            model.retiring = True
            model.on_drained = self._unload
            if not model.sessions:
                self._unload(model)
        return model

    def _unload(self, model: ServedModel) -> None:
        versions = self._versions[model.name]
        del versions[model.version]
        if not versions:  # the model's last version: the model goes (never the server's default, see retire)
            del self._versions[model.name]
            del self._defaults[model.name]
        self._on_unloaded(model)

    def _sorted(self, name: str) -> list[str]:
        return sorted(self._versions[name], key=version_order)
