"""DynamicConv1d / DynamicConv2d / DynamicConv3d: convolutions over the active input / output channels."""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DynamicChannelMixin, autocast_dtype
from .cost_terms import Bilinear, CostTerms, LayerCall, parameter_counts, per_channel_parameters

__all__ = ["DynamicConv1d", "DynamicConv2d", "DynamicConv3d"]


def _is_depthwise(conv: nn.Module) -> bool:
    """One filter per input channel, no channel multiplier: channel ``i`` in makes channel ``i`` out."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


class _DynamicConvNd(DynamicChannelMixin):
    """A convolution over ``N`` spatial dims computing only the selected channels: x ``[B, K_in, *spatial]`` ->
    ``[B, K_out, *spatial']`` (or unbatched ``[K_in, *spatial]``).

    The compact weight ``[K_out, K_in / groups, *kernel]`` is gathered from the full one by
    ``pyprune.kernels.gather_channels`` (differentiable; its backward scatters into the full gradient).
    Any stride / padding (incl. ``'same'``) / dilation / ``padding_mode`` works.

    * Depthwise (``groups == in_channels == out_channels > 1``): in and out are one selection and the active
      ``groups`` is the active count.
    * Other grouped convs keep ``groups``; each selection must keep the same count in every group. The global
      in index is turned into the per-group local form ``[G, K_in / G]`` the kernel takes.

    Subclasses set ``_torch_type`` and ``_conv`` (the functional convolution of that rank).
    """

    _channel_tensors = ("weight", "bias")
    _conv = staticmethod(F.conv2d)

    @classmethod
    def channel_counts(cls, module: nn.Module) -> Tuple[int, int]:
        return module.out_channels, module.in_channels

    @classmethod
    def shares_selection(cls, module: nn.Module) -> bool:
        return _is_depthwise(module)

    @classmethod
    def selection_groups(cls, module: nn.Module) -> int:
        return 1 if _is_depthwise(module) else module.groups  # depthwise: any selection works, groups follows it

    @classmethod
    def importance_rows(cls, module: nn.Module) -> Optional[Tensor]:
        return cls.full_tensor(module, "weight").flatten(1)

    @classmethod
    def channelwise(cls, module: nn.Module) -> bool:
        return _is_depthwise(module)

    @classmethod
    def probe_inputs(cls, module: nn.Module):
        spatial = tuple(k * d + s + 2 for k, d, s in zip(module.kernel_size, module.dilation, module.stride))
        return [((2, module.in_channels) + spatial, 1)]

    @classmethod
    def cost_terms(cls, module: nn.Module, calls: Sequence[LayerCall]) -> CostTerms:
        """FLOPs ``2 * positions * out * (in / groups) * prod(kernel)`` (positions: batch x output spatial size,
        summed over calls); params ``out * in / groups * prod(kernel)`` plus per output channel a bias (and any other
        per-output parameter, e.g. a served layer's gain). Depthwise: the active groups follow the one width ``w``,
        so both are per channel: ``2 * positions * prod(kernel) * w`` and ``prod(kernel) * w``."""
        kernel = math.prod(module.kernel_size)
        spatial = len(module.kernel_size)
        positions = 0
        for call in calls:  # output [N, C, *S] or unbatched [C, *S]
            shape = call.output.shape
            positions += (shape[0] if len(shape) == spatial + 2 else 1) * math.prod(shape[-spatial:])
        per_output = per_channel_parameters(module, module.out_channels, skip=("weight",))
        if _is_depthwise(module):
            flops, weight = Bilinear(c=2.0 * positions * kernel), Bilinear(c=float(kernel))
        else:
            per_weight = kernel / module.groups
            flops, weight = Bilinear(a=2.0 * positions * per_weight), Bilinear(a=per_weight)
        return CostTerms(flops, parameter_counts(module, {"weight": weight, **per_output}))

    def active_attributes(self):
        return {"out_channels": self.active_out_channels, "in_channels": self.active_in_channels,
                "groups": self.active_groups}

    def _channel_dims(self, x: Tensor) -> Tuple[int, str]:
        unbatched = x.dim() == len(self.kernel_size) + 1  # torch convs also take unbatched [C, *spatial]
        return (0 if unbatched else 1), "channels"

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

    def _gather_form(self, x: Tensor):
        """(autocast dtype or None, channels_last(_3d) when ``x`` is in it, else None), or None for the plain form:
        the compact weight comes out as the convolution wants it, without a separate cast or layout copy."""
        dtype = autocast_dtype(x)
        memory_format = None
        if x.dim() in (4, 5) and not x.is_contiguous():
            layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            memory_format = layout if x.is_contiguous(memory_format=layout) else None
        return None if dtype is None and memory_format is None else (dtype, memory_format)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        weight, bias = self.active_tensors(x)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._conv(x, weight, bias, self.stride, 0, self.dilation, self.active_groups)
        return self._conv(x, weight, bias, self.stride, self.padding, self.dilation, self.active_groups)

    def _static_module(self) -> nn.Module:
        return self._torch_type(self.active_in_channels, self.active_out_channels, self.kernel_size, self.stride,
                                self.padding, self.dilation, self.active_groups, self.bias is not None,
                                self.padding_mode, device="meta")


class DynamicConv1d(_DynamicConvNd, nn.Conv1d):
    """``nn.Conv1d`` over the active channels: x ``[N, K_in, L]`` -> ``[N, K_out, L']``. See ``_DynamicConvNd``."""

    _torch_type = nn.Conv1d
    _conv = staticmethod(F.conv1d)


class DynamicConv2d(_DynamicConvNd, nn.Conv2d):
    """``nn.Conv2d`` over the active channels: x ``[N, K_in, H, W]`` -> ``[N, K_out, H', W']``. See
    ``_DynamicConvNd``."""

    _torch_type = nn.Conv2d
    _conv = staticmethod(F.conv2d)


class DynamicConv3d(_DynamicConvNd, nn.Conv3d):
    """``nn.Conv3d`` over the active channels: x ``[N, K_in, D, H, W]`` -> ``[N, K_out, D', H', W']``. See
    ``_DynamicConvNd``."""

    _torch_type = nn.Conv3d
    _conv = staticmethod(F.conv3d)
