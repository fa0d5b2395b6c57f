"""The example input a model is run on (to trace it, count its FLOPs, time it), in every form a user may give it.

One normalisation for the whole library: :func:`as_call_args` turns any of these into ``(args, kwargs)`` for
``model(*args, **kwargs)``, tensors on the model's device:

* a tensor ``x``: ``model(x)``;
* a shape, a tuple or list of positive ints (mmrazor's ``demo_input=(1, 3, 224, 224)``): ``model(torch.rand(shape))``;
* a tuple of positional inputs ``(x, mask)``: ``model(x, mask)``;
* a list of tensors (torchvision detection's ``list[Tensor[3, H, W]]``): ``model([img0, img1])``, one argument;
* a dict of keyword inputs ``{'input_ids': ids}``: ``model(input_ids=ids)``;
* :class:`CallArgs` ``(args, kwargs)``: both;
* a DemoInput config dict (``dict(type='DefaultDemoInput', input_shape=...)``, built through ``TASK_UTILS``), a
  DemoInput object (anything with ``get_data(model)``, as mmrazor's) or any callable (called with the model if it
  takes an argument, else with none) returning one of the forms above.

Messages describe inputs with :func:`describe` (shapes and dtypes, never tensor values). :func:`input_config` writes
an input as JSON for a saved config and :class:`StructuredDemoInput` reads it back as random tensors of the same
shapes and dtypes.
"""
import inspect
from collections.abc import Mapping
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..errors import ConfigError
from ..registry import MODELS, TASK_UTILS

__all__ = ["CallArgs", "StructuredDemoInput", "as_call_args", "check_demo_input", "resolve", "describe",
           "describe_call", "input_config", "is_shape", "model_device", "call_model", "tensor_leaves"]

# How many items of a list / dict :func:`describe` names before it summarises the rest.
DESCRIBE_ITEMS = 6


class CallArgs(NamedTuple):
    """Positional and keyword inputs of one call, ``model(*args, **kwargs)``."""
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]


def is_shape(value) -> bool:
    """Whether ``value`` is a tuple or list of positive ints (a tensor shape such as ``(1, 3, 224, 224)``)."""
    return isinstance(value, (tuple, list)) and not isinstance(value, CallArgs) and len(value) > 0 and all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)


def model_device(model: Optional[nn.Module]) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); cpu for none."""
    if model is not None:
        for tensor in list(model.parameters())[:1] + list(model.buffers())[:1]:
            return tensor.device
    return torch.device("cpu")


def _is_config(value) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("type"), (str, type))


def _is_maker(value) -> bool:
    """A DemoInput or any other callable that makes the input (a tensor or a module is not one)."""
    return not isinstance(value, (Tensor, nn.Module, type)) and (hasattr(value, "get_data") or callable(value))


def _make(maker, model: Optional[nn.Module]):
    """Call a DemoInput (``get_data(model)``) or a callable: with the model when it takes an argument."""
    fn = maker.get_data if hasattr(maker, "get_data") else maker
    try:
        takes_model = len(inspect.signature(fn).parameters) > 0
    except (TypeError, ValueError):  # a builtin without a signature: try the model
        takes_model = True
    try:
        return fn(model) if takes_model else fn()
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"demo_input: {type(maker).__name__} raised {type(error).__name__}: "
                          f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}") from error


def resolve(demo_input, model: Optional[nn.Module] = None):
    """The input itself: configs are built and makers called (once); a shape becomes ``torch.rand(shape)``.
    Returns a tensor, a tuple, a list, a dict or a :class:`CallArgs`; anything else is a :class:`ConfigError`."""
    if _is_config(demo_input):
        demo_input = TASK_UTILS.build(dict(demo_input))
    if _is_maker(demo_input):
        made = _make(demo_input, model)
        if _is_maker(made) or _is_config(made):
            raise ConfigError(f"demo_input: {type(demo_input).__name__} returned {describe(made)}, not an input")
        demo_input = made
    if is_shape(demo_input):
        return torch.rand(tuple(demo_input), device=model_device(model))
    if isinstance(demo_input, (tuple, list)) and not isinstance(demo_input, CallArgs) and demo_input and all(
            isinstance(d, int) and not isinstance(d, bool) for d in demo_input):
        raise ConfigError(f"demo_input: a shape must be positive ints, got {describe(demo_input)}")
    if isinstance(demo_input, (tuple, list, Mapping)) and not isinstance(demo_input, CallArgs) and not demo_input:
        raise ConfigError(f"demo_input: {describe(demo_input)} is empty; give the model's inputs")
    if isinstance(demo_input, (Tensor, tuple, list, Mapping)):
        return demo_input
    raise ConfigError(f"demo_input must be a tensor, a shape (positive ints), a tuple of positional inputs, a list "
                      f"(e.g. of images), a dict of keyword inputs, a DemoInput (object or config dict) or a "
                      f"callable returning one; got {describe(demo_input)}")


def check_demo_input(demo_input) -> None:
    """Raise :class:`ConfigError` where ``demo_input`` has no form :func:`as_call_args` takes. A maker (DemoInput
    or callable) is not called: it may need the model."""
    if _is_config(demo_input):
        demo_input = TASK_UTILS.build(dict(demo_input))
    if not _is_maker(demo_input):
        as_call_args(demo_input)


def as_call_args(demo_input, device=None, model: Optional[nn.Module] = None) -> CallArgs:
    """``(args, kwargs)`` such that ``model(*args, **kwargs)`` runs the example ``demo_input`` (any form of the
    module docstring), every tensor moved to ``device`` (default: ``model``'s device; None and no model: left)."""
    value = resolve(demo_input, model)
    if isinstance(value, CallArgs):
        args, kwargs = tuple(value.args), dict(value.kwargs)
    elif isinstance(value, Tensor) or isinstance(value, list):
        args, kwargs = (value,), {}
    elif isinstance(value, tuple):
        args, kwargs = value, {}
    else:  # a Mapping
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"demo_input: a dict of keyword inputs needs str keys, got {describe(bad)}")
        args, kwargs = (), dict(value)
    if device is None and model is not None:
        device = model_device(model)
    if device is not None:
        args, kwargs = pytree.tree_map(lambda v: v.to(device) if isinstance(v, Tensor) else v, (args, kwargs))
    return CallArgs(tuple(args), dict(kwargs))


def call_model(model: nn.Module, inputs: CallArgs):
    """``model(*inputs.args, **inputs.kwargs)``."""
    return model(*inputs.args, **inputs.kwargs)


def tensor_leaves(value) -> List[Tensor]:
    """Every tensor in ``value`` (nested tuples, lists, dicts, :class:`CallArgs`), in order."""
    return [leaf for leaf in pytree.tree_leaves(_plain(value)) if isinstance(leaf, Tensor)]


def _plain(value):
    """:class:`CallArgs` as a plain pair, so pytree walks into it."""
    return (tuple(value.args), dict(value.kwargs)) if isinstance(value, CallArgs) else value


def describe(value) -> str:
    """A short text for messages: tensors by shape and dtype (``tensor of shape (3, 8, 8), dtype float32``),
    structures item by item, other objects by type; never a tensor's values."""
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, CallArgs):
        return f"positional {describe(tuple(value.args))} and keyword {describe(dict(value.kwargs))}"
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, type):  # numpy and the like
        return f"{type(value).__name__} of shape {tuple(value.shape)}, dtype {value.dtype}"
    if isinstance(value, (list, tuple)):
        items = [describe(v) for v in value[:DESCRIBE_ITEMS]]
        if len(value) > DESCRIBE_ITEMS:
            items.append(f"... {len(value) - DESCRIBE_ITEMS} more")
        open_, close = ("[", "]") if isinstance(value, list) else ("(", ",)" if len(value) == 1 else ")")
        return open_ + ", ".join(items) + close
    if isinstance(value, Mapping):
        keys = list(value)
        items = [f"{k!r}: {describe(value[k])}" for k in keys[:DESCRIBE_ITEMS]]
        if len(keys) > DESCRIBE_ITEMS:
            items.append(f"... {len(keys) - DESCRIBE_ITEMS} more")
        return "{" + ", ".join(items) + "}"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    return f"an object of type {type(value).__name__}"


def describe_call(inputs: CallArgs) -> str:
    """:func:`describe` of each input of a call: ``tensor of shape (1, 3, 8, 8), dtype float32, mask=...``."""
    parts = [describe(a) for a in inputs.args] + [f"{k}={describe(v)}" for k, v in inputs.kwargs.items()]
    return ", ".join(parts) if parts else "no inputs"


# ---- config files --------------------------------------------------------------------------------------------
def _leaf_config(value):
    if isinstance(value, Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, (list, tuple)):
        return [_leaf_config(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _leaf_config(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"demo_input: {describe(value)} cannot be written to a config")


def input_config(value) -> Any:
    """JSON for a config file: a single float32 tensor as its shape (mmrazor's ``demo_input``), anything else as a
    :class:`StructuredDemoInput` config dict. Reading either back gives random inputs of the same shapes."""
    if isinstance(value, Tensor) and value.dtype == torch.float32:
        return list(value.shape)
    call = as_call_args(value)
    return {"type": "StructuredDemoInput", "args": _leaf_config(list(call.args)),
            "kwargs": _leaf_config(call.kwargs)}


def _is_leaf_spec(value) -> bool:
    return isinstance(value, Mapping) and set(value) == {"shape", "dtype"}


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"StructuredDemoInput: unknown dtype {name!r}")
    return dtype


def _build_leaf(spec, device):
    if _is_leaf_spec(spec):
        shape, dtype = spec["shape"], _dtype(spec["dtype"])
        if not (isinstance(shape, (list, tuple)) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ConfigError(f"StructuredDemoInput: a shape must be non-negative ints, got {describe(shape)}")
        if dtype.is_floating_point or dtype.is_complex:
            return torch.rand(tuple(shape), dtype=dtype, device=device)
        return torch.zeros(tuple(shape), dtype=dtype, device=device)  # ids / masks / flags: zeros are valid
    if isinstance(spec, (list, tuple)):
        return [_build_leaf(v, device) for v in spec]
    if isinstance(spec, Mapping):
        return {k: _build_leaf(v, device) for k, v in spec.items()}
    return spec


@TASK_UTILS.register_module()
class StructuredDemoInput:
    """Random inputs in a given structure, as :func:`input_config` writes them to a config.

    Args:
        args: the positional inputs; each tensor written ``{'shape': [...], 'dtype': 'float32'}``, lists and dicts
            nest (``[[{'shape': [3, 128, 128], 'dtype': 'float32'}, ...]]`` is one list of images).
        kwargs: the keyword inputs, written the same way.

    Floating tensors are uniform in [0, 1); integer and bool tensors are zeros. ``get_data(model)`` returns a
    :class:`CallArgs` with the tensors on the model's device.
    """

    def __init__(self, args: Sequence = (), kwargs: Optional[Mapping] = None):
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs or {}, Mapping):
            raise ConfigError(f"StructuredDemoInput: args must be a list and kwargs a dict, got {describe(args)} and "
                              f"{describe(kwargs)}")
        self.args, self.kwargs = list(args), dict(kwargs or {})
        self.get_data(None)  # a bad spec fails here, where the config is read

    def get_data(self, model: Optional[nn.Module] = None) -> CallArgs:
        device = model_device(model)
        return CallArgs(tuple(_build_leaf(a, device) for a in self.args),
                        {k: _build_leaf(v, device) for k, v in self.kwargs.items()})

    def __call__(self, model: Optional[nn.Module] = None) -> CallArgs:
        return self.get_data(model)


MODELS.register_module(module=StructuredDemoInput)
