"""DynamicChannelNorm: the layer kind of norms pyprune knows by what they are, not by their class.

HuggingFace's ``LlamaRMSNorm`` / ``Qwen2RMSNorm`` / ``MistralRMSNorm`` / ``GemmaRMSNorm`` / ``T5LayerNorm``,
timm's ``RmsNorm`` / ``RmsNorm2d``, torch's ``nn.RMSNorm``, and the same pattern in anyone's code, are plain
``nn.Module`` subclasses (not subclasses of a norm pyprune lists) with a per-channel ``weight`` ``[C]`` and a
forward that normalises over the channel dim. They are recognised in two steps:

1. :meth:`DynamicChannelNorm.matches`, a structural test: a 1-D ``weight`` ``[C]`` (C > 1); every other parameter /
   buffer of the module is ``[C]`` (a bias, running statistics) or holds one value (an ``eps`` tensor, a gain);
   no child module holds a parameter or buffer.
2. the serving probe (:mod:`pyprune.ops.served`): run through its own forward at a reduced width with channels on
   the last dim of ``[2, L, C]`` or on dim 1 of ``[2, C, L, L]``, the layer must keep its output shape, and
   (:meth:`DynamicChannelNorm.probe_check`) be *permutation-equivariant* over the channels (permuting the input's
   channels together with every per-channel tensor permutes the output the same way) and *scale-invariant* (it
   normalises: three times the input gives the same output). Any statistic over the channels (mean, variance,
   RMS) passes; a layer that mixes channels by position (a flip, a cumulative sum, a matrix) or does not
   normalise (an activation with a per-channel slope, ``nn.PReLU(C)``) does not, and stays as it was.

A layer that passes is served through its own forward (its per-channel tensors and width attributes at the active
width while it runs) and exports to its own class. In and out are one selection; ``weight`` is its norm scale.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import UninitializedParameter

from .base import DynamicChannelMixin, NormLayerKind
from .compact_state import full_shape_of

__all__ = ["DynamicChannelNorm"]


class DynamicChannelNorm(NormLayerKind, DynamicChannelMixin, nn.Module):
    """Layer kind (and served DynamicOp base) of a structurally recognised channel norm (see the module docstring).

    Never a layer itself: ``to_dynamic`` (or :meth:`convert_from`) gives the served class ``Served<Class>``
    (``ServedForward``, this kind, the layer's own class), which runs the layer's own forward. An ``nn.Module``
    subclass only so that it can key the layer-kind table like the torch types.
    """

    _torch_type = nn.Module
    _channel_tensors = ("weight",)  # a bias [C] (and any other [C] tensor) is served as a per-channel extra

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """The structural test (step 1 of the module docstring); cheap, no forward. torch's batch / instance norm
        family (``SyncBatchNorm``, ``InstanceNorm*d``) is left out: their training-mode statistics (momentum,
        cross-process reduction) are more than an eval-mode probe can check."""
        if isinstance(module, _NormBase):
            return False
        weight = module._parameters.get("weight")
        if not isinstance(weight, Tensor) or isinstance(weight, UninitializedParameter) or weight.dim() != 1 \
                or weight.shape[0] < 2:
            return False
        channels = weight.shape[0]
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None and tensor.numel() != 1 and tuple(tensor.shape) != (channels,):
                return False
        return not any(t is not None for child in module.modules() if child is not module
                       for t in list(child._parameters.values()) + list(child._buffers.values()))

    @classmethod
    def convert_from(cls, module: nn.Module) -> DynamicChannelMixin:
        from .served import served_class
        return served_class(type(module), cls).convert_from(module)

    @classmethod
    def channel_counts(cls, module: nn.Module) -> Tuple[int, int]:
        # the weight's full size: in compact training mode the weight itself is the compact copy
        channels = full_shape_of(module, "weight")[0]
        return channels, channels

    @classmethod
    def probe_inputs(cls, module: nn.Module):
        channels = cls.channel_counts(module)[0]
        other = 5 if channels != 5 else 6  # a size that cannot be mistaken for the channels
        return [((2, other, channels), -1), ((2, channels, other, other), 1)]

    @classmethod
    def probe_check(cls, op: DynamicChannelMixin, x: Tensor, dim: int) -> Optional[str]:
        """At full width on ``x`` (channels on ``dim``): permutation equivariance (``op``, a probe copy, with its
        per-channel tensors permuted, on the permuted input, must give the permuted output) and scale invariance
        (three times the input, the same output: it normalises). Changes ``op``."""
        op.set_out_index(None)
        channels = cls.channel_counts(op)[0]
        order = torch.randperm(channels, device=x.device)
        expected = op(x)
        with torch.no_grad():
            for tensor in op._source_tensors():
                if tensor is not None and tensor.dim() == 1 and tensor.shape[0] == channels:
                    tensor.copy_(tensor[order])
        permuted = x.index_select(dim, order)
        got = op(permuted)
        if not isinstance(got, Tensor) or got.shape != expected.shape or not torch.allclose(
                got, expected.index_select(dim % expected.dim(), order), rtol=1e-4, atol=1e-5):
            return "it mixes channels (its output does not follow a permutation of its input channels)"
        scaled = op(permuted * 3.0)  # eps moves a norm's output by ~eps / mean(x^2): far below the tolerance
        if not isinstance(scaled, Tensor) or not torch.allclose(scaled, got, rtol=1e-2, atol=1e-3):
            return "it does not normalise (its output changes when its input is scaled)"
        return None

    def active_attributes(self) -> Dict[str, object]:
        """Every public attribute that spells the full width ``C``: an int ``C`` (``hidden_size``,
        ``num_features``) or a one-element shape ``(C,)`` (``normalized_shape``), at the active width."""
        names = self.__dict__.get("_width_attributes")
        if names is None:
            channels = self.channel_counts(self)[0]
            names = {}
            for key, value in self.__dict__.items():
                if key.startswith("_") or isinstance(value, bool):
                    continue
                if isinstance(value, int) and value == channels:
                    names[key] = int
                elif isinstance(value, (tuple, list, torch.Size)) and tuple(value) == (channels,):
                    names[key] = type(value)
            self.__dict__["_width_attributes"] = names
        count = self.active_out_channels
        return {key: count if kind is int else kind((count,)) for key, kind in names.items()}
