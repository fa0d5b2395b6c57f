"""SequentialMutableChannelUnit: keeps the first channels."""
from torch import Tensor

from ..ops.selection import prefix_index
from .base import MutableChannelUnit
from .registry import register_unit


@register_unit
class SequentialMutableChannelUnit(MutableChannelUnit):
    """Keeps a prefix: the first ``K / groups`` channels of every group (mmrazor's sequential unit)."""

    def apply_count(self, count: int) -> None:
        """A prefix depends on the count alone: the same count again changes nothing (no layer is touched)."""
        if count != self.active_channels or self._custom_index:
            super().apply_count(count)

    def _select(self, count: int) -> Tensor:
        return prefix_index(count, self.num_channels, self.groups, self.device)
