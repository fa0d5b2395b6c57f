"""The main job behind ``pyprune prune``: its typed options (:mod:`.config`), models, training step and loop
pieces, distributed setup, run directory, reports; :func:`load_pruned_run` reads what a run wrote.

Names load on first access, so that ``pyprune.app.training.config`` imports without torch (the command line parses
and checks its options before the job starts).
"""
import importlib

__all__ = ["load_pruned_run"]


def __getattr__(name: str):
    if name == "load_pruned_run":
        return importlib.import_module(".pruned_run", __name__).load_pruned_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
