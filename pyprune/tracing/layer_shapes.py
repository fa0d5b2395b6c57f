"""Output shapes of the compute-heavy layers (plain ``Conv1d/2d/3d``, ``Linear``), without computing them.

The tracer only needs shapes, and a model's convolutions and linear layers are nearly all the arithmetic of its
forward. For these layers the output shape follows from the input shape and the layer's hyper-parameters, so the
shape pass (:mod:`.shape_pass`) and the recorded forward (:mod:`.record`) hand on a zero tensor of that shape
instead. Anything the formula does not cover exactly - a subclass with its own forward, an input the layer would
reject - returns None, and the layer runs for real (raising its own error). Both track which values derive from
such zeros, and :func:`reads_values` says where one would decide a shape or a Python value: there they start
again computing every layer.
"""
import math
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_globals

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


class ValuesNeeded(BaseException):
    """An op would read values derived from a skipped layer's zeros. A BaseException, so that the model's own
    ``except Exception`` (the recorded forward runs its code) cannot take it for an error of its own."""


# Ops whose output shape or Python result depends on their input's values; Python's conversions by their dunder
# names (``Tensor.float`` is a cast, ``Tensor.__float__`` reads the value).
VALUE_READS = frozenset({
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "item", "tolist", "bincount",
    "repeat_interleave", "histc", "histogram", "numpy", "equal", "allclose", "is_nonzero",
    "__bool__", "__int__", "__float__", "__index__", "__complex__"})
# Ops whose output shape depends on a boolean index's values.
INDEXING = frozenset({"getitem", "setitem", "__getitem__", "__setitem__", "index", "index_put", "index_put_"})


def reads_values(name: str, args, kwargs, is_derived: Callable[[Tensor], bool]) -> bool:
    """Whether op ``name`` (a function's or method's ``__name__``) may turn values that derive from skipped layers
    (those ``is_derived`` says) into a shape or a Python value; called for ops that read such values."""
    if name in VALUE_READS or (name == "where" and len(args) == 1 and not kwargs):
        return True
    if any(v.dim() == 0 and is_derived(v) for v in tensors_in((args, kwargs))):
        return True  # a zero-dim tensor may be used as a size, a count or an index bound
    if name in INDEXING:
        return any(v.dtype == torch.bool for v in tensors_in((args[1:], kwargs)))
    return False


def tensors_in(value) -> Iterator[Tensor]:
    """The tensors in ``value`` and its lists, tuples and dicts (the recorded forward asks this of every torch
    call's arguments: pytree's generality costs more than the call itself)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


def skipped_output(module: nn.Module, args: tuple, kwargs: dict) -> Optional[Tensor]:
    """A zero tensor shaped as ``module.forward(*args, **kwargs)``'s output, or None where the layer must run."""
    if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    shape = _output_shape(module, x)
    if shape is None:
        return None
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (its own or torch's global ones) besides its forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module_globals._global_forward_hooks or
                module_globals._global_forward_pre_hooks)


def can_skip(module: nn.Module) -> bool:
    """Whether ``module`` is a plain conv / linear layer, whose output shape :func:`skipped_output` knows."""
    return "forward" not in vars(module) and _plain_base(module) is not None


def _plain_base(module: nn.Module) -> Optional[type]:
    """``nn.Linear`` / ``nn.ConvNd`` where ``module`` computes exactly what that class does, else None."""
    kind = type(module)
    if nn.utils.parametrize.is_parametrized(module):
        return None
    if isinstance(module, nn.Linear):
        return nn.Linear if kind.forward is nn.Linear.forward else None
    base = next((b for b in _CONVS if isinstance(module, b)), None)
    if base is not None and kind.forward is base.forward and kind._conv_forward is base._conv_forward:
        return base
    return None


def _output_shape(module: nn.Module, x: Tensor) -> Optional[Tuple[int, ...]]:
    base = _plain_base(module)
    if base is nn.Linear:
        return _linear_shape(module, x)
    return None if base is None else _conv_shape(module, x, _CONVS[base])


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
