"""DynamicLayerNorm: nn.LayerNorm over the active channels, channels last or (ConvNeXt's LayerNorm2d) first."""
import weakref
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import DynamicChannelMixin, NormLayerKind

__all__ = ["DynamicLayerNorm", "is_channels_first_layer_norm"]

_CHANNELS_FIRST = weakref.WeakKeyDictionary()  # module -> bool, so the probe runs once per module


def is_channels_first_layer_norm(module: nn.Module) -> bool:
    """An ``nn.LayerNorm`` subclass (same constructor, one normalized dim ``C``) whose own ``forward`` normalises
    dim 1 of ``[N, C, *]`` over its channels, as torchvision's ``LayerNorm2d`` does (permute, layer_norm, permute
    back). Decided by running the module on a probe once, not by its name."""
    if not isinstance(module, nn.LayerNorm) or type(module).forward is nn.LayerNorm.forward or \
            type(module).__init__ is not nn.LayerNorm.__init__ or len(module.normalized_shape) != 1:
        return False
    if module not in _CHANNELS_FIRST:
        _CHANNELS_FIRST[module] = _probe_channels_first(module)
    return _CHANNELS_FIRST[module]


def _probe_channels_first(module: nn.LayerNorm) -> bool:
    weight = module.weight
    options = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
    x = torch.randn(2, module.normalized_shape[0], 3, 2, generator=torch.Generator().manual_seed(0)).to(**options)
    try:
        with torch.no_grad():
            got = module.forward(x)
            expected = F.layer_norm(x.movedim(1, -1), module.normalized_shape, module.weight, module.bias,
                                    module.eps).movedim(-1, 1)
    except Exception:  # the subclass does something else with this shape
        return False
    return isinstance(got, Tensor) and got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)


class DynamicLayerNorm(NormLayerKind, DynamicChannelMixin, nn.LayerNorm):
    """``nn.LayerNorm`` with one normalized dim (the channel dim): x ``[*, K]`` is normalised over its ``K`` active
    channels, with the compact affine weight / bias ``[K]``. One selection (in == out).

    Converted from a channels-first subclass (:func:`is_channels_first_layer_norm`, e.g. ``LayerNorm2d``), it
    normalises dim 1 of ``x`` ``[N, K, *]`` instead and exports to that subclass.
    """

    _torch_type = nn.LayerNorm
    _channel_tensors = ("weight", "bias")

    @classmethod
    def _check_convertible(cls, module: nn.Module) -> None:
        if len(module.normalized_shape) != 1:
            raise ConfigError(f"{cls.__name__}: only a LayerNorm over one (the channel) dim can be pruned, "
                              f"got normalized_shape={tuple(module.normalized_shape)}")

    @classmethod
    def convert_from(cls, module: nn.Module) -> "DynamicLayerNorm":
        if type(module).forward is not nn.LayerNorm.forward and not is_channels_first_layer_norm(module):
            raise ConfigError(f"{cls.__name__}: {type(module).__name__} overrides forward in a way pyprune does not "
                              f"recognise as a channels-last or channels-first LayerNorm (pyprune.ops.to_dynamic "
                              f"serves such layers through their own forward)")
        channels_first = is_channels_first_layer_norm(module)
        op = super().convert_from(module)
        op._export_type = type(module) if channels_first else nn.LayerNorm  # its forward is the one to keep
        op.channels_first = channels_first
        return op

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_convertible(self)
        self._export_type, self.channels_first = nn.LayerNorm, False

    @classmethod
    def channel_counts(cls, module: nn.LayerNorm) -> Tuple[int, int]:
        return module.normalized_shape[-1], module.normalized_shape[-1]

    @classmethod
    def probe_inputs(cls, module: nn.LayerNorm):
        channels = module.normalized_shape[-1]
        other = 5 if channels != 5 else 6  # a size that cannot be mistaken for the channels
        return [((2, other, channels), -1), ((2, channels, other, other), 1)]

    def active_attributes(self):
        return {"normalized_shape": (self.active_out_channels,)}

    def _channel_dims(self, x: Tensor) -> Tuple[int, str]:
        return (1 if self.channels_first else x.dim() - 1), "channels"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        weight, bias = self.active_tensors()
        if self.channels_first:
            return F.layer_norm(x.movedim(1, -1), (self.active_out_channels,), weight, bias, self.eps).movedim(-1, 1)
        return F.layer_norm(x, (self.active_out_channels,), weight, bias, self.eps)

    def _static_module(self) -> nn.LayerNorm:
        return self._export_type(self.active_out_channels, self.eps, self.elementwise_affine, device="meta",
                                 **self._bias_kwargs())
