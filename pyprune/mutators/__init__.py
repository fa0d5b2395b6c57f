"""Mutators: own a model's channel units, their choices and the pruning structure config (and its files)."""
from .channel_mutator import ChannelMutator, export_static, full_width_export
from .dcff import DCFFChannelMutator
from .dmcp import DMCPChannelMutator
from .group_fisher import GroupFisherChannelMutator
from .io import load_pruned, save_pruned
from .slimmable import SlimmableChannelMutator
from .summary import PruningSummary, count_flops, count_params

__all__ = ["ChannelMutator", "GroupFisherChannelMutator", "export_static", "full_width_export", "PruningSummary", "count_flops",
           "count_params", "save_pruned", "load_pruned"]
__all__ += ["DCFFChannelMutator"]
__all__ += ["DMCPChannelMutator"]
__all__ += ["SlimmableChannelMutator"]
