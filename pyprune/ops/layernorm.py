"""DynamicLayerNorm: nn.LayerNorm over the active channels of the last dim."""
from typing import Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import DynamicChannelMixin

__all__ = ["DynamicLayerNorm"]


class DynamicLayerNorm(DynamicChannelMixin, nn.LayerNorm):
    """``nn.LayerNorm`` with one normalized dim (the channel dim, last): x ``[*, K]`` is normalised over its ``K``
    active channels, with the compact affine weight / bias ``[K]``. One selection (in == out)."""

    _torch_type = nn.LayerNorm
    _channel_tensors = ("weight", "bias")

    @classmethod
    def _check_convertible(cls, module: nn.Module) -> None:
        if len(module.normalized_shape) != 1:
            raise ConfigError(f"{cls.__name__}: only a LayerNorm over one (the last, channel) dim can be pruned, "
                              f"got normalized_shape={tuple(module.normalized_shape)}")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_convertible(self)

    def _full_channels(self) -> Tuple[int, int]:
        return self.normalized_shape[0], self.normalized_shape[0]

    def _one_selection(self) -> bool:
        return True

    def _channel_dims(self, x: Tensor) -> Tuple[int, str]:
        return x.dim() - 1, "channels"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        weight, bias = self._compact_tensors()
        return F.layer_norm(x, (self.active_out_channels,), weight, bias, self.eps)

    def _static_module(self) -> nn.LayerNorm:
        return nn.LayerNorm(self.active_out_channels, self.eps, self.elementwise_affine, device="meta",
                            **self._bias_kwargs())
