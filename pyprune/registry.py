"""Name -> class registries, so that config dicts (``dict(type='L1MutableChannelUnit', ...)``) find classes.

pyprune's stand-in for mmengine's registries, which mmrazor configs are written against:

* ``MODELS``: units, mutators, algorithms, mutable channels / values, and your own model classes;
* ``TASK_UTILS``: the channel analyzer and demo inputs (where mmrazor keeps them).

``MODELS.build(cfg)`` replaces mmengine's ``MODELS.build(cfg)``: it pops ``type`` (a registered name or a class),
drops ``_scope_`` and calls the class with the remaining keys. Register your own classes by name with the
decorator ``@MODELS.register_module()`` (or ``MODELS.register_module(name='X', module=cls)``). Two scopes are
understood: ``'torchvision.resnet18'`` / ``dict(_scope_='torchvision', type='resnet18')`` builds a torchvision model
(``weights=None`` unless given); any other scope (``'mmrazor'``, ``'mmcls'``) is ignored and the name looked up
here. pyprune's own classes register themselves when their package is imported; a lookup that misses imports them
first, so ``import pyprune.registry`` alone is enough to build any of them.

This module imports nothing heavy (no torch), so it is safe to import from anywhere in pyprune.
"""
import importlib
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Optional

from .errors import ConfigError

__all__ = ["Registry", "MODELS", "TASK_UTILS", "build"]

# Packages whose classes register themselves on import; imported on the first lookup that misses.
_BUILTIN_PACKAGES = ("pyprune.units", "pyprune.mutators", "pyprune.algorithms")
_SCOPES_IGNORED = ("mmrazor", "mmcls", "mmengine", "mmdet", "mmseg", "mmpose", "pyprune")


class Registry:
    """A named table of classes (or functions returning objects) that configs refer to by name.

    Args:
        name: what the table holds, for messages (``'model'``).
        builtin_packages: modules to import the first time a name is not found (they register pyprune's classes).
    """

    def __init__(self, name: str, builtin_packages: Iterable[str] = ()):
        self.name = name
        self._module_dict: Dict[str, Callable] = {}
        self._builtin_packages = tuple(builtin_packages)
        self._builtins_imported = False

    # ------------------------------------------------------------------------------------------------- registering
    def register_module(self, name: Optional[str] = None, force: bool = False, module: Optional[Callable] = None):
        """Register ``module`` under ``name`` (default: its ``__name__``). Used as a decorator when ``module`` is
        not given: ``@MODELS.register_module()``. A name that is taken raises ConfigError unless ``force``."""
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{self.name} registry: a name must be a str, got {name!r}")

        def register(obj: Callable) -> Callable:
            if not callable(obj):
                raise ConfigError(f"{self.name} registry: can only register classes or functions, got {obj!r}")
            key = name or obj.__name__
            existing = self._module_dict.get(key)
            if existing is not None and existing is not obj and not force:
                raise ConfigError(f"{self.name} registry: {key!r} is already registered as {existing!r}; pass "
                                  f"force=True to replace it")
            self._module_dict[key] = obj
            return obj

        return register if module is None else register(module)

    def remove_module(self, name: str) -> None:
        """Forget ``name`` (e.g. an alias a test or plugin registered for a while); unknown names are ignored."""
        self._module_dict.pop(name, None)

    # ----------------------------------------------------------------------------------------------------- lookup
    @property
    def module_dict(self) -> Dict[str, Callable]:
        """``{name: class}`` of everything registered (pyprune's built-ins included)."""
        self._import_builtins()
        return dict(self._module_dict)

    def __contains__(self, name) -> bool:
        return self.get(name, None) is not None

    def __len__(self) -> int:
        return len(self.module_dict)

    def get(self, name, default: Any = ...) -> Any:
        """The class registered as ``name`` (``'scope.Name'`` is looked up as ``Name``); a class is returned as
        is. Unknown: ``default`` if given, else ConfigError listing what is registered."""
        if isinstance(name, type) or (callable(name) and not isinstance(name, str)):
            return name
        if isinstance(name, str):
            key = name.rsplit(".", 1)[-1] if name.split(".", 1)[0] in _SCOPES_IGNORED else name
            if key not in self._module_dict:
                self._import_builtins()
            if key in self._module_dict:
                return self._module_dict[key]
        if default is not ...:
            return default
        raise ConfigError(f"{self.name} registry: no {self.name} type named {name!r}; register your class with "
                          f"@pyprune.registry.MODELS.register_module() (registered: {sorted(self._module_dict)})")

    def _import_builtins(self) -> None:
        if self._builtins_imported:
            return
        self._builtins_imported = True
        for package in self._builtin_packages:
            importlib.import_module(package)

    # ------------------------------------------------------------------------------------------------------ build
    def build(self, cfg, **default_args) -> Any:
        """Build the object a config dict describes: ``type`` names the class, the other keys are its arguments
        (``default_args`` fill the ones missing). ``_scope_`` selects torchvision or is ignored (see module doc).
        A built object (not a dict) is returned as is."""
        if not isinstance(cfg, Mapping):
            return cfg
        args = dict(default_args)
        args.update(cfg)
        scope = args.pop("_scope_", None)
        if "type" not in args:
            raise ConfigError(f"{self.name} config needs a 'type' key, got keys {sorted(args)}")
        kind = args.pop("type")
        if isinstance(kind, str) and (scope == "torchvision" or kind.startswith("torchvision.")):
            return _build_torchvision(kind.rsplit(".", 1)[-1], args)
        builder = self.get(kind)
        try:
            return builder(**args)
        except TypeError as error:  # an argument the class does not take: say which config asked for it
            raise ConfigError(f"cannot build {self.name} {kind!r} from its config: {error}") from None

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {len(self._module_dict)} registered)"


def _build_torchvision(name: str, args: Dict[str, Any]):
    import torchvision
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"torchvision has no classification model named {name!r}")
    args.setdefault("weights", None)  # configs never download weights implicitly
    return torchvision.models.get_model(name, **args)


MODELS = Registry("model", _BUILTIN_PACKAGES)
TASK_UTILS = Registry("task util", _BUILTIN_PACKAGES)


def build(cfg, registry: Registry = MODELS, **default_args) -> Any:
    """``registry.build(cfg, **default_args)`` (mmengine's ``build_from_cfg``)."""
    return registry.build(cfg, **default_args)
