"""pyprune: structured channel pruning for PyTorch on fused C++/CUDA channel kernels.

The main classes are importable from here (``from pyprune import ChannelMutator, ItePruneAlgorithm``), as in
mmrazor's ``mmrazor.models``. They are loaded on first access (module ``__getattr__``), so ``import pyprune`` stays
light: it imports neither torch nor the compiled extension.
"""
import importlib
from typing import Dict

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS: Dict[str, str] = {
    # registries
    "MODELS": "pyprune.registry", "TASK_UTILS": "pyprune.registry", "Registry": "pyprune.registry",
    # mutators
    "ChannelMutator": "pyprune.mutators", "export_static": "pyprune.mutators", "save_pruned": "pyprune.mutators",
    "load_pruned": "pyprune.mutators", "PruningSummary": "pyprune.mutators",
    # algorithms
    "BaseAlgorithm": "pyprune.algorithms", "ItePruneAlgorithm": "pyprune.algorithms",
    "ItePruneConfigManager": "pyprune.algorithms",
    # units and what they are built from
    "MutableChannelUnit": "pyprune.units", "SequentialMutableChannelUnit": "pyprune.units",
    "L1MutableChannelUnit": "pyprune.units", "L2MutableChannelUnit": "pyprune.units", "BNScaleMutableChannelUnit": "pyprune.units",
    "TaylorMutableChannelUnit": "pyprune.units", "OneShotMutableChannelUnit": "pyprune.units",
    "SlimmableChannelUnit": "pyprune.units", "register_unit": "pyprune.units", "make_divisible": "pyprune.units",
    "ChannelUnit": "pyprune.units", "ChannelAnalyzer": "pyprune.units", "DefaultDemoInput": "pyprune.units",
    "ConfigLeniencyWarning": "pyprune.units", "SimpleMutableChannel": "pyprune.units",
    "SquentialMutableChannel": "pyprune.units", "SequentialMutableChannel": "pyprune.units",
    "OneShotMutableChannel": "pyprune.units", "MutableValue": "pyprune.units", "OneShotMutableValue": "pyprune.units",
    "ChannelRef": "pyprune.channels", "UnitSpec": "pyprune.channels",
    # dynamic ops
    "DynamicChannelMixin": "pyprune.ops", "DynamicConv1d": "pyprune.ops", "DynamicConv2d": "pyprune.ops",
    "DynamicConv3d": "pyprune.ops", "DynamicLinear": "pyprune.ops", "DynamicBatchNorm1d": "pyprune.ops",
    "DynamicBatchNorm2d": "pyprune.ops", "DynamicBatchNorm3d": "pyprune.ops", "DynamicLayerNorm": "pyprune.ops",
    "DynamicGroupNorm": "pyprune.ops", "DynamicMultiheadAttention": "pyprune.ops",
    # tracing and errors
    "trace_channel_units": "pyprune.tracing",
    "PyPruneError": "pyprune.errors", "ConfigError": "pyprune.errors", "ChannelSelectionError": "pyprune.errors",
    "UntraceableOpError": "pyprune.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
