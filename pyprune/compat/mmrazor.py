"""mmrazor's channel-pruning names, in one place: ``from pyprune.compat.mmrazor import ChannelMutator, ...``.

A script written for mmrazor's pruning runs on pyprune with its ``mmrazor.*`` / ``mmengine.*`` imports pointed here.
Every name is pyprune's own object (``pyprune.compat.mmrazor.ChannelMutator is pyprune.ChannelMutator``), so
classes, ``isinstance`` checks and registry lookups agree whichever way they were imported. :data:`MMRAZOR_MODULES`
says which mmrazor module each name mirrors; docs/COMING_FROM_MMRAZOR.md has the same map and the remaining
differences.

pyprune's own workflow (the mutator, the algorithms, three unit kinds, compact training, budgets, save / load,
errors) is also at the top level, ``from pyprune import ChannelMutator``; the rest of this vocabulary lives here
and in pyprune's subpackages (``pyprune.units``, ``pyprune.ops``, ``pyprune.registry``).
"""
from typing import Dict

from ..algorithms import BaseAlgorithm, ItePruneAlgorithm, ItePruneConfigManager
from ..algorithms.group_fisher import GroupFisherAlgorithm
from ..mutators.group_fisher import GroupFisherChannelMutator
from ..units.group_fisher import GroupFisherChannelUnit
from ..algorithms.dmcp import DMCP
from ..algorithms.dcff import DCFF
from ..mutators import ChannelMutator
from ..mutators.dcff import DCFFChannelMutator
from ..mutators.dmcp import DMCPChannelMutator
from ..units.dmcp import DMCPChannelUnit
from ..ops import (DynamicBatchNorm1d, DynamicBatchNorm2d, DynamicBatchNorm3d, DynamicChannelMixin, DynamicConv1d,
                   DynamicConv2d, DynamicConv3d, DynamicGroupNorm, DynamicLayerNorm, DynamicLinear,
                   DynamicMultiheadAttention)
from ..ops.predefined import (BigNasConv2d, DynamicConv2dAdaptivePadding, DynamicPatchEmbed, DynamicRelativePosition2D,
                              DynamicSequential, OFAConv2d)
from ..units.mutable_channel_container import MutableChannelContainer
from ..registry import MODELS, TASK_UTILS, Registry
from ..units import (ChannelAnalyzer, ChannelUnit, DefaultDemoInput, L1MutableChannelUnit, MutableChannelUnit,
                     MutableValue, OneShotMutableChannel, OneShotMutableChannelUnit, OneShotMutableValue,
                     SequentialMutableChannel, SequentialMutableChannelUnit, SimpleMutableChannel,
                     SlimmableChannelUnit, SquentialMutableChannel, make_divisible)
from ..ops.fuse_conv import FuseConv2d
from ..units.dcff import DCFFChannelUnit
from ..algorithms.slimmable import SlimmableNetwork
from ..mutators.slimmable import SlimmableChannelMutator
from ..ops.switchable_bn import SwitchableBatchNorm2d

_DYNAMIC_OPS = "mmrazor.models.architectures.dynamic_ops"
_GROUP_FISHER = "mmrazor.implementations.pruning.group_fisher"  # mmrazor 1.x keeps GroupFisher there

# name -> the mmrazor / mmengine module a script imports it from. pyprune's additions that have no mmrazor
# counterpart (Conv1d / Conv3d / GroupNorm ops, the correctly spelled SequentialMutableChannel) sit with the names
# they belong to.
MMRAZOR_MODULES: Dict[str, str] = {
    "MODELS": "mmrazor.registry", "TASK_UTILS": "mmrazor.registry", "Registry": "mmengine.registry",
    "ChannelMutator": "mmrazor.models.mutators",
    "BaseAlgorithm": "mmrazor.models.algorithms", "ItePruneAlgorithm": "mmrazor.models.algorithms",
    "ItePruneConfigManager": "mmrazor.models.algorithms.pruning.ite_prune_algorithm",
    "GroupFisherAlgorithm": _GROUP_FISHER, "GroupFisherChannelMutator": _GROUP_FISHER,
    "GroupFisherChannelUnit": _GROUP_FISHER,
    "DMCP": "mmrazor.models.algorithms", "DMCPChannelMutator": "mmrazor.models.mutators",
    "DMCPChannelUnit": "mmrazor.models.mutables",
    "MutableChannelUnit": "mmrazor.models.mutables", "SequentialMutableChannelUnit": "mmrazor.models.mutables",
    "L1MutableChannelUnit": "mmrazor.models.mutables", "OneShotMutableChannelUnit": "mmrazor.models.mutables",
    "SlimmableChannelUnit": "mmrazor.models.mutables",
    "ChannelUnit": "mmrazor.models.mutables.mutable_channel.units.channel_unit",
    "SimpleMutableChannel": "mmrazor.models.mutables", "SquentialMutableChannel": "mmrazor.models.mutables",
    "SequentialMutableChannel": "mmrazor.models.mutables", "OneShotMutableChannel": "mmrazor.models.mutables",
    "MutableValue": "mmrazor.models.mutables", "OneShotMutableValue": "mmrazor.models.mutables",
    "ChannelAnalyzer": "mmrazor.models.task_modules",
    "DefaultDemoInput": "mmrazor.models.task_modules.demo_inputs",
    "DynamicChannelMixin": _DYNAMIC_OPS, "DynamicConv1d": _DYNAMIC_OPS, "DynamicConv2d": _DYNAMIC_OPS,
    "DynamicConv3d": _DYNAMIC_OPS, "DynamicLinear": _DYNAMIC_OPS, "DynamicBatchNorm1d": _DYNAMIC_OPS,
    "DynamicBatchNorm2d": _DYNAMIC_OPS, "DynamicBatchNorm3d": _DYNAMIC_OPS, "DynamicLayerNorm": _DYNAMIC_OPS,
    "DynamicGroupNorm": _DYNAMIC_OPS, "DynamicMultiheadAttention": _DYNAMIC_OPS,
    "MutableChannelContainer": "mmrazor.models.mutables", "BigNasConv2d": _DYNAMIC_OPS, "OFAConv2d": _DYNAMIC_OPS,
    "DynamicSequential": _DYNAMIC_OPS, "DynamicPatchEmbed": _DYNAMIC_OPS, "DynamicRelativePosition2D": _DYNAMIC_OPS,
    "DynamicConv2dAdaptivePadding": _DYNAMIC_OPS,
    "make_divisible": "mmrazor.models.utils",
    "DCFF": "mmrazor.models.algorithms", "DCFFChannelMutator": "mmrazor.models.mutators",
    "DCFFChannelUnit": "mmrazor.models.mutables", "FuseConv2d": _DYNAMIC_OPS,
    "SlimmableNetwork": "mmrazor.models.algorithms", "SlimmableChannelMutator": "mmrazor.models.mutators",
    "SwitchableBatchNorm2d": _DYNAMIC_OPS,
}

__all__ = list(MMRAZOR_MODULES)
