"""pyprune: structured channel pruning for PyTorch on fused C++/CUDA channel kernels.

The top level holds pyprune's own workflow, fifteen names::

    from pyprune import ChannelMutator, ItePruneAlgorithm, compact_training, prune_to_budget, save_pruned

* trace and prune: :class:`ChannelMutator` (owns the units, their choices and the config),
  :func:`trace_channel_units` (the coupled channel groups of a model, without changing it);
* when and how much: :class:`BaseAlgorithm`, :class:`ItePruneAlgorithm`;
* unit kinds by how they pick channels: :class:`SequentialMutableChannelUnit` (the first ones),
  :class:`L1MutableChannelUnit` (weight magnitude), :class:`TaylorMutableChannelUnit` (gradient evidence); the
  other kinds are in :mod:`pyprune.units`, and configs name any kind as a string;
* training at the pruned width: :func:`compact_training`, :class:`GraphedTrainStep` (CUDA graphs per subnet);
* budgets: :func:`prune_to_budget`;
* files: :func:`save_pruned`, :func:`load_pruned` (``mutator.export(model)`` / ``algorithm.export()`` make the
  plain model);
* errors: :class:`PyPruneError` (the base of every input error), :class:`ConfigError`,
  :class:`ChannelSelectionError`.

mmrazor's spellings (``SquentialMutableChannel``, ``ChannelAnalyzer``, the dynamic ops, ``MODELS``, ...) are served
from :mod:`pyprune.compat.mmrazor`. Names that used to be here still resolve for one release, with one
``DeprecationWarning`` per name saying where they live now.

Names load on first access (module ``__getattr__``), so ``import pyprune`` stays light: it imports neither torch
nor the compiled extension.
"""
import importlib
import warnings
from typing import Dict

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS: Dict[str, str] = {
    "ChannelMutator": "pyprune.mutators", "trace_channel_units": "pyprune.tracing",
    "BaseAlgorithm": "pyprune.algorithms", "ItePruneAlgorithm": "pyprune.algorithms",
    "SequentialMutableChannelUnit": "pyprune.units", "L1MutableChannelUnit": "pyprune.units",
    "TaylorMutableChannelUnit": "pyprune.units",
    "compact_training": "pyprune.ops", "GraphedTrainStep": "pyprune.graphs",
    "prune_to_budget": "pyprune.budget",
    "save_pruned": "pyprune.mutators", "load_pruned": "pyprune.mutators",
    "PyPruneError": "pyprune.errors", "ConfigError": "pyprune.errors", "ChannelSelectionError": "pyprune.errors",
}

_MMRAZOR = "pyprune.compat.mmrazor"
# names that were top-level before -> where to import them from now (each access warns once, then is cached)
_MOVED: Dict[str, str] = {
    **{name: _MMRAZOR for name in (
        "MODELS", "TASK_UTILS", "Registry", "ItePruneConfigManager", "MutableChannelUnit", "OneShotMutableChannelUnit",
        "SlimmableChannelUnit", "make_divisible", "ChannelUnit", "ChannelAnalyzer", "DefaultDemoInput",
        "SimpleMutableChannel", "SquentialMutableChannel", "SequentialMutableChannel", "OneShotMutableChannel",
        "MutableValue", "OneShotMutableValue", "DynamicChannelMixin", "DynamicConv1d", "DynamicConv2d",
        "DynamicConv3d", "DynamicLinear", "DynamicBatchNorm1d", "DynamicBatchNorm2d", "DynamicBatchNorm3d",
        "DynamicLayerNorm", "DynamicGroupNorm", "DynamicMultiheadAttention", "MutableChannelContainer", "BigNasConv2d",
        "OFAConv2d", "DynamicSequential", "DynamicPatchEmbed", "DynamicRelativePosition2D",
        "DynamicConv2dAdaptivePadding")},
    **{name: _MMRAZOR for name in ("DCFF", "DCFFChannelMutator", "DCFFChannelUnit", "FuseConv2d")},
    **{name: _MMRAZOR for name in ("SlimmableNetwork", "SlimmableChannelMutator", "SwitchableBatchNorm2d")},
    **{name: _MMRAZOR for name in ("DMCP", "DMCPChannelMutator", "DMCPChannelUnit")},
    **{name: _MMRAZOR for name in ("GroupFisherAlgorithm", "GroupFisherChannelMutator", "GroupFisherChannelUnit")},
    # pyprune's own names that are not part of the everyday workflow: their packages
    "export_static": "pyprune.mutators", "PruningSummary": "pyprune.mutators",
    "L2MutableChannelUnit": "pyprune.units", "BNScaleMutableChannelUnit": "pyprune.units",
    "register_unit": "pyprune.units", "ConfigLeniencyWarning": "pyprune.units",
    "ChannelRef": "pyprune.channels", "UnitSpec": "pyprune.channels", "UntraceableOpError": "pyprune.errors",
}

__all__ = list(_EXPORTS)

# the application (job, CLI, data, bench) lives in pyprune.app; its old paths resolve for one release, with a warning
from .compat import moved_modules as _moved_modules  # noqa: E402  (after the tables above, imports no torch)

_moved_modules.install()


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        module = _MOVED.get(name)
        if module is None:
            raise AttributeError(f"module 'pyprune' has no attribute {name!r}")
        # stacklevel 2 is the line that named pyprune.X: warnings skips importlib's frames, so a
        # `from pyprune import X` points at the user's import line too
        warnings.warn(f"pyprune.{name} is deprecated; import it from {module}", DeprecationWarning, stacklevel=2)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function (so a moved name warns once)
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
