"""DynamicConv2d: nn.Conv2d over the active input / output channels."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .base import DynamicChannelMixin

__all__ = ["DynamicConv2d"]


def _is_depthwise(conv: nn.Conv2d) -> bool:
    """One filter per input channel, no channel multiplier: channel ``i`` in makes channel ``i`` out."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


class DynamicConv2d(DynamicChannelMixin, nn.Conv2d):
    """``nn.Conv2d`` computing only the selected channels: x ``[N, K_in, H, W]`` -> ``[N, K_out, H', W']``.

    The compact weight ``[K_out, K_in / groups, kh, kw]`` is gathered from the full one by
    ``pyprune.kernels.gather_channels`` (differentiable; its backward scatters into the full gradient).
    Any stride / padding (incl. ``'same'``) / dilation / ``padding_mode`` works.

    * Depthwise (``groups == in_channels == out_channels > 1``): in and out are one selection and the active
      ``groups`` is the active count.
    * Other grouped convs keep ``groups``; each selection must keep the same count in every group. The global
      in index is turned into the per-group local form ``[G, K_in / G]`` the kernel takes.
    """

    _torch_type = nn.Conv2d
    _channel_tensors = ("weight", "bias")

    @classmethod
    def channel_counts(cls, module: nn.Conv2d) -> Tuple[int, int]:
        return module.out_channels, module.in_channels

    @classmethod
    def shares_selection(cls, module: nn.Conv2d) -> bool:
        return _is_depthwise(module)

    @classmethod
    def selection_groups(cls, module: nn.Conv2d) -> int:
        return 1 if _is_depthwise(module) else module.groups  # depthwise: any selection works, groups follows it

    @classmethod
    def importance_rows(cls, module: nn.Conv2d) -> Optional[Tensor]:
        return cls.full_tensor(module, "weight").flatten(1)

    def _channel_dims(self, x: Tensor) -> Tuple[int, str]:
        return (0 if x.dim() == 3 else 1), "channels"  # nn.Conv2d also takes unbatched [C, H, W]

    @property
    def is_depthwise(self) -> bool:
        return _is_depthwise(self)

    @property
    def active_groups(self) -> int:
        return self._active_out if self.is_depthwise else self.groups

    def _after_selection_change(self) -> None:
        self.__dict__["_grouped_in_index"] = self._local_in_index(self._in_index)  # no nn.Module.__setattr__

    def _local_in_index(self, index: Optional[Tensor]) -> Optional[Tensor]:
        """Global in index ``[K]`` -> per-group local ``[G, K / G]`` (grouped conv; other convs keep ``[K]``)."""
        if index is None or self.groups == 1 or self.is_depthwise:
            return index
        per_group = self.in_channels // self.groups
        offsets = torch.arange(self.groups, device=index.device).unsqueeze(1) * per_group
        return index.reshape(self.groups, -1) - offsets

    def _kernel_indices(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        return self._out_index, self._grouped_in_index

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        weight, bias = self._compact_tensors()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, _pair(0), self.dilation, self.active_groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.active_groups)

    def _static_module(self) -> nn.Conv2d:
        return nn.Conv2d(self.active_in_channels, self.active_out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.active_groups, self.bias is not None, self.padding_mode,
                         device="meta")
