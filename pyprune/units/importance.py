"""ImportanceMutableChannelUnit: keeps the channels that score highest on some importance measure."""
from typing import Optional

import torch
from torch import Tensor

from ..ops.selection import prefix_index
from .base import MutableChannelUnit


def per_unit_channel(rows: Tensor, num_channels: int) -> Tensor:
    """Sum per-row scores ``[num_channels * expand]`` into per-unit-channel scores ``[num_channels]``."""
    return rows.reshape(num_channels, -1).sum(1)


def normalized(scores: Tensor) -> Tensor:
    """Scale one layer's scores to mean 1, so a layer's weight magnitude does not decide for all of them."""
    return scores / scores.mean().clamp_min(torch.finfo(scores.dtype).tiny)


class ImportanceMutableChannelUnit(MutableChannelUnit):
    """Base of the units that rank channels: ``channel_importance() -> [num_channels]`` (higher = keep).

    The selection is the top ``K / groups`` of every group, found with ``topk`` on the device and sorted (``K`` is
    a Python int, so there is no ``nonzero`` and no host sync). Before the unit can see any weights (not prepared
    yet) or when the measure has nothing to go on, the first channels are kept.
    """

    def channel_importance(self) -> Optional[Tensor]:
        """Float ``[num_channels]`` on the layers' device, or ``None`` when there is nothing to rank by."""
        raise NotImplementedError

    def _select(self, count: int) -> Tensor:
        with torch.no_grad():
            scores = self.channel_importance() if self._modules else None
            if scores is None:
                return prefix_index(count, self.num_channels, self.groups, self.device)
            blocks = scores.reshape(self.groups, -1)
            top = blocks.topk(count // self.groups, dim=1, sorted=False).indices
            top = top + torch.arange(self.groups, device=top.device).unsqueeze(1) * blocks.shape[1]
            return top.reshape(-1).sort().values

    def refresh(self) -> None:
        """Re-rank at the current width (the weights changed since the choice was set)."""
        self.apply_count(self._count)
