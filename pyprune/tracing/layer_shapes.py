"""Output shapes of the compute-heavy layers (plain ``Conv1d/2d/3d``, ``Linear``), without computing them.

The shape pass only needs shapes, and a model's convolutions and linear layers are nearly all the arithmetic of its
forward. For these layers the output shape follows from the input shape and the layer's hyper-parameters, so the
pass hands on a zero tensor of that shape instead (:mod:`.shape_pass` makes sure no later op reads those values in
a way that could change a shape). Anything the formula does not cover exactly - a subclass with its own forward,
hooks, an input the layer would reject - returns None, and the layer runs for real (raising its own error).
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def skipped_output(module: nn.Module, args: tuple, kwargs: dict) -> Optional[Tensor]:
    """A zero tensor shaped as ``module(*args, **kwargs)``'s output, or None where the layer must run."""
    if kwargs or len(args) != 1 or not isinstance(args[0], Tensor) or _has_hooks(module):
        return None
    x = args[0]
    shape = _output_shape(module, x)
    if shape is None:
        return None
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


def _has_hooks(module: nn.Module) -> bool:
    from torch.nn.modules import module as module_globals  # torch's global hooks run on every module call
    return bool(module._forward_hooks or module._forward_pre_hooks or module_globals._global_forward_hooks or
                module_globals._global_forward_pre_hooks)


def _output_shape(module: nn.Module, x: Tensor) -> Optional[Tuple[int, ...]]:
    kind = type(module)
    if nn.utils.parametrize.is_parametrized(module):
        return None
    for base, dims in _CONVS.items():
        if isinstance(module, base) and kind.forward is base.forward and kind._conv_forward is base._conv_forward:
            return _conv_shape(module, x, dims)
    if isinstance(module, nn.Linear) and kind.forward is nn.Linear.forward:
        return _linear_shape(module, x)
    return None


def _same_tensor_kind(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    return all(t is None or (t.dtype == x.dtype and t.device == x.device and t.layout == x.layout == torch.strided)
               for t in (weight, bias))


def _linear_shape(module: nn.Linear, x: Tensor) -> Optional[Tuple[int, ...]]:
    weight, bias = module.weight, module.bias
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or not _same_tensor_kind(x, weight, bias):
        return None
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return None
    return tuple(x.shape[:-1]) + (weight.shape[0],)


def _conv_shape(module: nn.modules.conv._ConvNd, x: Tensor, dims: int) -> Optional[Tuple[int, ...]]:
    """``floor((L + 2 p - d (k - 1) - 1) / s) + 1`` per spatial dim, zero padding only (reflect padding has its own
    size limits)."""
    weight, bias = module.weight, module.bias
    if module.padding_mode != "zeros" or x.dim() not in (dims + 1, dims + 2) or weight.dim() != dims + 2 or not _same_tensor_kind(x, weight, bias):
        return None
    if x.shape[-dims - 1] != weight.shape[1] * module.groups or weight.shape[0] % module.groups:
        return None
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return None
    if module.padding == "same":
        padding = None  # the output keeps the input size (stride 1 is enforced at construction)
    elif module.padding == "valid":
        padding = (0,) * dims
    else:
        padding = tuple(module.padding)
    spatial = []
    for i in range(dims):
        size = x.shape[x.dim() - dims + i]
        kernel = module.dilation[i] * (weight.shape[2 + i] - 1) + 1
        if padding is None:
            out = size
            if size < 1:
                return None
        else:
            out = math.floor((size + 2 * padding[i] - kernel) / module.stride[i]) + 1
            if size + 2 * padding[i] < kernel:
                return None  # the real conv raises "kernel size can't be greater than actual input size"
        if out < 1:
            return None
        spatial.append(out)
    return tuple(x.shape[:-dims - 1]) + (weight.shape[0],) + tuple(spatial)
