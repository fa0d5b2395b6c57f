"""Small helpers units use on the model: channel counts, DynamicOp conversion and in-place module replacement."""
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

from .. import ops
from ..errors import ConfigError


def is_dynamic(layer) -> bool:
    """A DynamicOp, or a channel-sized tensor that already serves its kept channels."""
    return isinstance(layer, ops.DynamicChannelMixin) or (isinstance(layer, ops.ChannelParameter) and layer.attached)


def has_one_selection(layer) -> bool:
    """Whether ``layer``'s in and out channels are one selection (norms, attention, depthwise conv, channel
    tensors); False for layers pyprune does not know."""
    kind = ops.layer_kind(layer)
    return kind is not None and kind.shares_selection(layer)


def module_channel_count(module, is_output: bool, where: str = "") -> int:
    """Full number of output (``is_output``) or input channels of a prunable layer or channel tensor."""
    kind = ops.layer_kind(module)
    if kind is None:
        raise ConfigError(f"{where or type(module).__name__}: {type(module).__name__} has no channel dimension "
                          f"pyprune knows how to prune")
    return kind.channel_counts(module)[0 if is_output else 1]


def selection_groups(module) -> int:
    """Equal blocks a unit's selection must keep balanced on ``module`` (1 for layers pyprune does not know)."""
    kind = ops.layer_kind(module)
    return 1 if kind is None else kind.selection_groups(module)


def module_device(module) -> torch.device:
    """Device of the module's first parameter or buffer (cpu when it has none), or of a channel tensor."""
    if isinstance(module, ops.ChannelParameter):
        return module.device
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def get_module(model: nn.Module, name: str, where: str = "") -> nn.Module:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise ConfigError(f"{where}: the model has no module named {name!r}") from None


def get_layer(model: nn.Module, ref, where: str = ""):
    """What a unit's ref names: a module; for a channel-sized tensor (``ref.param_dim`` set) its
    :class:`~pyprune.ops.ChannelParameter`, for an int attribute its :class:`~pyprune.ops.ChannelCount` (the
    attached ones once the model is prepared)."""
    try:
        return get_module(model, ref.name, where)
    except ConfigError:
        pass  # a channel tensor, or an int attribute holding a channel count (ViT's hidden_dim)
    try:
        return ops.channel_parameter(model, ref.name, ref.param_dim, span=ref.end)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def to_dynamic_layer(layer):
    """The DynamicOp for a module (itself if it already is one; None when there is none), or the channel tensor
    itself (it is made to serve its kept channels by :func:`replace_modules`)."""
    return layer if isinstance(layer, ops.ChannelParameter) else ops.to_dynamic(layer)


def plan_dynamic_conversion(model: nn.Module, refs: Iterable, where: str = "") -> Dict[str, object]:
    """DynamicOps (or channel tensors) for the layers ``refs`` name that are not dynamic yet, without touching
    ``model``. A module that has no DynamicOp raises ConfigError (naming it and ``where``) before anything changes.
    """
    plan: Dict[str, object] = {}
    for ref in refs:
        layer = get_layer(model, ref, where)
        if ref.name in plan or is_dynamic(layer):
            continue
        dynamic = to_dynamic_layer(layer)
        if dynamic is None:
            raise ConfigError(f"{where}: module {ref.name!r} ({type(layer).__name__}) has no DynamicOp; exclude it "
                              f"from pruning with fixed=[{ref.name!r}]")
        dynamic.pyprune_name = ref.name  # error messages name the layer by its path
        plan[ref.name] = dynamic
    return plan


def _parents_of(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """id(child) -> every (parent, attribute) that holds it (a module registered twice is found twice)."""
    parents: Dict[int, List[Tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for attribute, child in parent._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((parent, attribute))
    return parents


def replace_modules(model: nn.Module, replacements: Dict[str, object]) -> None:
    """Swap each named module for its replacement everywhere the same object is registered in ``model``;
    channel tensors (:class:`~pyprune.ops.ChannelParameter`) are attached to their owners instead."""
    if not replacements:
        return
    parents = _parents_of(model)
    for name, new in replacements.items():
        if isinstance(new, ops.ChannelParameter):
            new.attach()  # a tensor, not a module: its owner starts serving the kept channels
            continue
        old = model.get_submodule(name)
        for parent, attribute in parents.get(id(old), []):
            setattr(parent, attribute, new)
