"""Small helpers units use on the model: channel counts, DynamicOp conversion and in-place module replacement."""
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

from ..errors import ConfigError


def ops_package():
    """``pyprune.ops``, imported lazily: units are importable (and testable) without the ops being built."""
    from .. import ops
    return ops


def is_dynamic(module: nn.Module) -> bool:
    return isinstance(module, ops_package().DynamicChannelMixin)


def is_norm(module: nn.Module) -> bool:
    """Norm layers have a single channel dim: their in and out selections are the same thing."""
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))


def module_channel_count(module: nn.Module, is_output: bool, where: str = "") -> int:
    """Full number of output (``is_output``) or input channels of a conv / linear / norm layer."""
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
    raise ConfigError(f"{where or type(module).__name__}: {type(module).__name__} has no channel dimension "
                      f"pyprune knows how to prune")


def module_device(module: nn.Module) -> torch.device:
    """Device of the module's first parameter or buffer (cpu when it has none)."""
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


def plan_dynamic_conversion(model: nn.Module, names: Iterable[str], where: str = "") -> Dict[str, nn.Module]:
    """DynamicOps for the named modules that are not dynamic yet, without touching ``model``.

    A module that has no DynamicOp raises ConfigError (naming it and ``where``) before anything is replaced.
    """
    ops = ops_package()
    plan: Dict[str, nn.Module] = {}
    for name in dict.fromkeys(names):
        module = get_module(model, name, where)
        if isinstance(module, ops.DynamicChannelMixin):
            continue
        dynamic = ops.to_dynamic(module)
        if dynamic is None:
            raise ConfigError(f"{where}: module {name!r} ({type(module).__name__}) has no DynamicOp; exclude it "
                              f"from pruning with fixed=[{name!r}]")
        dynamic.pyprune_name = name  # error messages name the layer by its path
        plan[name] = dynamic
    return plan


def _parents_of(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """id(child) -> every (parent, attribute) that holds it (a module registered twice is found twice)."""
    parents: Dict[int, List[Tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for attribute, child in parent._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((parent, attribute))
    return parents


def replace_modules(model: nn.Module, replacements: Dict[str, nn.Module]) -> None:
    """Swap each named module for its replacement everywhere the same object is registered in ``model``."""
    if not replacements:
        return
    parents = _parents_of(model)
    for name, new in replacements.items():
        old = model.get_submodule(name)
        for parent, attribute in parents.get(id(old), []):
            setattr(parent, attribute, new)
