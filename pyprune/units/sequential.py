"""SequentialMutableChannelUnit: keeps the first channels."""
from torch import Tensor

from .base import MutableChannelUnit, prefix_index
from .registry import register_unit


@register_unit
class SequentialMutableChannelUnit(MutableChannelUnit):
    """Keeps a prefix: the first ``K / groups`` channels of every group (mmrazor's sequential unit)."""

    def _select(self, count: int) -> Tensor:
        return prefix_index(self.num_channels, count, self.groups, self.device)
