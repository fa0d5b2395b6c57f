"""Mutable channel units: coupled channel groups that are pruned together, and how their choices reach layers."""
from .activation import ActivationMutableChannelUnit
from .analyzer import ChannelAnalyzer, DefaultDemoInput
from .assembler import LayerIndexAssembler
from .base import MutableChannelUnit
from .bn_scale import BNScaleMutableChannelUnit
from .calibration import calibrate, load_scores, save_scores
from .channel_unit import ChannelUnit
from .dcff import DCFFChannelUnit
from .dmcp import DMCPChannelUnit
from .group_fisher import GroupFisherChannelUnit
from .importance import ImportanceMutableChannelUnit
from .l1 import L1MutableChannelUnit
from .l2 import L2MutableChannelUnit
from .leniency import ConfigLeniencyWarning
from .mutable_channel import (OneShotMutableChannel, SequentialMutableChannel, SimpleMutableChannel,
                              SquentialMutableChannel)
from .mutable_value import MutableValue, OneShotMutableValue
from .one_shot import OneShotMutableChannelUnit
from .registry import UNITS, register_unit, unit_class
from .rounding import kept_channel_count, make_divisible, ratio_to_count
from .sequential import SequentialMutableChannelUnit
from .slimmable import SlimmableChannelUnit
from .taylor import TaylorMutableChannelUnit

__all__ = [
    "UNITS", "register_unit", "unit_class", "make_divisible", "kept_channel_count", "ratio_to_count",
    "LayerIndexAssembler", "ChannelUnit",
    "MutableChannelUnit", "ImportanceMutableChannelUnit", "SequentialMutableChannelUnit", "L1MutableChannelUnit",
    "L2MutableChannelUnit", "BNScaleMutableChannelUnit", "TaylorMutableChannelUnit", "OneShotMutableChannelUnit",
    "SlimmableChannelUnit", "GroupFisherChannelUnit", "ActivationMutableChannelUnit", "calibrate", "save_scores",
    "load_scores", "ChannelAnalyzer", "DefaultDemoInput", "ConfigLeniencyWarning",
    "SimpleMutableChannel", "SquentialMutableChannel", "SequentialMutableChannel", "OneShotMutableChannel",
    "MutableValue", "OneShotMutableValue",
    "DCFFChannelUnit",
    "DMCPChannelUnit",
]
