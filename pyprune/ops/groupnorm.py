"""DynamicGroupNorm: nn.GroupNorm over the active channels, keeping ``num_groups``."""
from typing import Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .base import DynamicChannelMixin, NormLayerKind

__all__ = ["DynamicGroupNorm"]


class DynamicGroupNorm(NormLayerKind, DynamicChannelMixin, nn.GroupNorm):
    """``nn.GroupNorm`` over the active channels: x ``[N, K, *]``, ``num_groups`` unchanged.

    A selection must keep the same number of channels in each of the ``num_groups`` groups, so that every
    active channel is normalised with the same companions as in the full layer (a ratio / count keeps the first
    ``K / num_groups`` channels of each group). One selection (in == out).
    """

    _torch_type = nn.GroupNorm
    _channel_tensors = ("weight", "bias")

    @classmethod
    def channel_counts(cls, module: nn.GroupNorm) -> Tuple[int, int]:
        return module.num_channels, module.num_channels

    @classmethod
    def selection_groups(cls, module: nn.GroupNorm) -> int:
        return module.num_groups

    @classmethod
    def probe_inputs(cls, module: nn.GroupNorm):
        return [((2, module.num_channels, 3, 3), 1)]

    def active_attributes(self):
        return {"num_channels": self.active_out_channels}

    def _channel_dims(self, x: Tensor) -> Tuple[int, str]:
        return 1, "channels"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        weight, bias = self.active_tensors()
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)

    def _static_module(self) -> nn.GroupNorm:
        return nn.GroupNorm(self.num_groups, self.active_out_channels, self.eps, self.affine, device="meta",
                            **self._bias_kwargs())
