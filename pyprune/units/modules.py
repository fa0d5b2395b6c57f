"""Small helpers units use on the model: channel counts, DynamicOp conversion and in-place module replacement."""
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

from ..errors import ConfigError


def ops_package():
    """``pyprune.ops``, imported lazily: units are importable (and testable) without the ops being built."""
    from .. import ops
    return ops


def is_dynamic(layer) -> bool:
    """A DynamicOp, or a channel-sized tensor that already serves its kept channels."""
    ops = ops_package()
    return isinstance(layer, ops.DynamicChannelMixin) or (isinstance(layer, ops.ChannelParameter) and layer.attached)


def is_norm(module: nn.Module) -> bool:
    """Norm layers have a single channel dim: their in and out selections are the same thing."""
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))


def has_one_selection(layer) -> bool:
    """Norms, attention (one embedding width) and channel-sized tensors: in and out selections are one thing."""
    ops = ops_package()
    return is_norm(layer) or isinstance(layer, ops.ATTENTION_TYPES + (ops.ChannelParameter,))


def module_channel_count(module, is_output: bool, where: str = "") -> int:
    """Full number of output (``is_output``) or input channels of a conv / linear / norm layer or channel tensor."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if is_output else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if is_output else module.in_features
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, ops_package().ATTENTION_TYPES):
        return ops_package().attention_width(module)
    if isinstance(module, ops_package().ChannelParameter):
        return module.num_channels
    raise ConfigError(f"{where or type(module).__name__}: {type(module).__name__} has no channel dimension "
                      f"pyprune knows how to prune")


def module_device(module) -> torch.device:
    """Device of the module's first parameter or buffer (cpu when it has none), or of a channel tensor."""
    if isinstance(module, ops_package().ChannelParameter):
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
    dim = getattr(ref, "param_dim", None)
    try:
        return get_module(model, ref.name, where)
    except ConfigError:
        pass  # a channel tensor, or an int attribute holding a channel count (ViT's hidden_dim)
    try:
        return ops_package().channel_parameter(model, ref.name, dim)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def to_dynamic_layer(layer):
    """The DynamicOp for a module (itself if it already is one; None when there is none), or the channel tensor
    itself (it is made to serve its kept channels by :func:`replace_modules`)."""
    ops = ops_package()
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
        if isinstance(new, ops_package().ChannelParameter):
            new.attach()  # a tensor, not a module: its owner starts serving the kept channels
            continue
        old = model.get_submodule(name)
        for parent, attribute in parents.get(id(old), []):
            setattr(parent, attribute, new)
