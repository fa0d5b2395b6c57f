"""Mutators: own a model's channel units, their choices and the pruning structure config."""
from .channel_mutator import ChannelMutator, export_static
from .summary import PruningSummary, count_flops, count_params

__all__ = ["ChannelMutator", "export_static", "PruningSummary", "count_flops", "count_params"]
