"""Old import paths of the application packages, served for one release with a ``DeprecationWarning``.

The job, CLI, data and benchmark code lives in :mod:`pyprune.app` (it sits on top of the library and nothing in the
library imports it). Code that still imports ``pyprune.training.job`` or ``pyprune.cli`` gets the module at its new
path - the same module object, so ``isinstance`` checks and monkeypatching keep working - and one warning per old
name saying where it lives now.

The aliasing is a meta-path finder rather than stub files, so every submodule of the moved packages resolves
without a stub per file, and the stubs cannot drift from the real modules.
"""
import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Dict, Optional

# old package prefix -> new package prefix
MOVED_PACKAGES: Dict[str, str] = {
    "pyprune.training": "pyprune.app.training",
    "pyprune.data": "pyprune.app.data",
    "pyprune.bench": "pyprune.app.bench",
    "pyprune.cli": "pyprune.app.cli",
}


def new_module_name(fullname: str) -> Optional[str]:
    """The new dotted path of an old application module name, or None if the name did not move."""
    for old, new in MOVED_PACKAGES.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old):]
    return None


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the already-importable module at its new path."""

    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def create_module(self, spec):
        # stacklevel 2 lands in importlib's frames, which warnings skips: the user's import line is reported
        warnings.warn(f"{self.old} is deprecated; import {self.new} (the application moved to pyprune.app)",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module):
        # the module was executed under its new name; the import system binds it under the old one too
        sys.modules[self.old] = module


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds ``pyprune.training`` / ``pyprune.data`` / ``pyprune.bench`` / ``pyprune.cli`` and their submodules."""

    def find_spec(self, fullname, path=None, target=None):
        new = new_module_name(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname, new),
                                              is_package=fullname in MOVED_PACKAGES and fullname != "pyprune.cli")


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
