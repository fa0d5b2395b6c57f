"""Conv2dAdaptivePadding: mmcv's convolution with TensorFlow's "same" padding, computed from each input's size.

The input is padded so that the output has ``ceil(H / stride)`` x ``ceil(W / stride)`` positions (the extra pixel,
when the padding is odd, goes bottom / right), then convolved without padding. A plain layer: the one
``DynamicConv2dAdaptivePadding.export()`` returns.
"""
import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Conv2dAdaptivePadding", "adaptive_pad"]


def adaptive_pad(x: Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """``x`` ``[N, C, H, W]`` zero-padded for a "same" output of ``ceil(H / stride)`` x ``ceil(W / stride)``."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel, stride, dilation):
        out = math.ceil(size / s)
        pads.append(max((out - 1) * s + (k - 1) * d + 1 - size, 0))
    pad_h, pad_w = pads
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


class Conv2dAdaptivePadding(nn.Conv2d):
    """``nn.Conv2d`` with "same" padding from the input's size (the ``padding`` argument is ignored: 0)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(adaptive_pad(x, self.weight.shape[-2:], self.stride, self.dilation))
