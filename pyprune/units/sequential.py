"""SequentialMutableChannelUnit: keeps the first channels."""
import torch
from torch import Tensor

from ..ops.selection import prefix_index
from .base import MutableChannelUnit
from .registry import register_unit

_HOST = torch.device("cpu")


@register_unit
class SequentialMutableChannelUnit(MutableChannelUnit):
    """Keeps a prefix: the first ``K / groups`` channels of every group (mmrazor's sequential unit).

    The prefix follows from the count alone, so it is built on the host (no device op per switch; the layers'
    indices reach the device in one copy, see :class:`~pyprune.units.LayerIndexAssembler`) and ``current_index``
    moves it to the layers' device on first use.
    """

    def apply_count(self, count: int) -> None:
        """A prefix depends on the count alone: the same count again changes nothing (no layer is touched)."""
        if count != self.active_channels or self._custom_index:
            super().apply_count(count)

    @property
    def selection_key(self):
        return ("version", self.version) if self._custom_index else self.active_channels

    def _select(self, count: int) -> Tensor:
        return prefix_index(count, self.num_channels, self.groups, _HOST)
