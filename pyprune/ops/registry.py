"""Which DynamicOp replaces which torch layer, and the one lookup every package asks about a layer's kind.

A layer's *kind* is the class that knows the facts about its type: its DynamicOp class for torch layers
(``channel_counts``, ``shares_selection``, ``selection_groups``, ``importance_rows``, ``norm_scale``; see
``DynamicChannelMixin``), :class:`ChannelParameter` for channel-sized tensors. Units, the mutator and the tracer ask
:func:`layer_kind` instead of testing torch types themselves, so adding a layer type is one DynamicOp class and
one entry in :data:`DYNAMIC_OPS`.
"""
from typing import Dict, Optional, Type

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .attention import WINDOW_ATTENTION_OPS, DynamicMultiheadAttention
from .base import DynamicChannelMixin
from .batchnorm import DynamicBatchNorm1d, DynamicBatchNorm2d, DynamicBatchNorm3d
from .conv import DynamicConv1d, DynamicConv2d, DynamicConv3d
from .groupnorm import DynamicGroupNorm
from .layernorm import DynamicLayerNorm, is_channels_first_layer_norm
from .linear import DynamicLinear
from .parameter import ChannelParameter
from .served import has_own_forward, served_class, serving_probe

__all__ = ["DYNAMIC_OPS", "to_dynamic", "layer_kind", "registered_base", "is_prunable_layer", "unservable_reason"]

# torch layer type -> DynamicOp type. Subclasses of these map through their nearest listed base (MRO order).
DYNAMIC_OPS: Dict[Type[nn.Module], Type[DynamicChannelMixin]] = {
    nn.Conv1d: DynamicConv1d,
    nn.Conv2d: DynamicConv2d,
    nn.Conv3d: DynamicConv3d,
    nn.Linear: DynamicLinear,
    nn.BatchNorm1d: DynamicBatchNorm1d,
    nn.BatchNorm2d: DynamicBatchNorm2d,
    nn.BatchNorm3d: DynamicBatchNorm3d,
    nn.LayerNorm: DynamicLayerNorm,
    nn.GroupNorm: DynamicGroupNorm,
    nn.MultiheadAttention: DynamicMultiheadAttention,
    **WINDOW_ATTENTION_OPS,  # torchvision's Swin attention (v1, v2), when torchvision is installed
}


def registered_base(module: nn.Module) -> Optional[Type[nn.Module]]:
    """The nearest base class of ``module`` (itself included) that :data:`DYNAMIC_OPS` lists, or None."""
    for base in type(module).__mro__:
        if base in DYNAMIC_OPS:
            return base
    return None


def layer_kind(layer) -> Optional[type]:
    """The class that answers the layer-kind questions for ``layer`` (a plain torch layer, a DynamicOp or a
    :class:`ChannelParameter`), or None for layers pyprune cannot prune."""
    if isinstance(layer, (DynamicChannelMixin, ChannelParameter)):
        return type(layer)
    base = registered_base(layer)
    return None if base is None else DYNAMIC_OPS[base]


def is_prunable_layer(module: nn.Module) -> bool:
    """A layer the tracer keeps opaque and the units can convert: a listed type (or subclass) that keeps its base's
    ``forward``, a channels-first LayerNorm subclass (torchvision's ``LayerNorm2d``), or a subclass whose own
    ``forward`` can be served at the active width (``pyprune.ops.served``: timm's ``BatchNormAct2d``, ...)."""
    base = registered_base(module)
    if base is None:
        return False
    if not has_own_forward(module, base) or is_channels_first_layer_norm(module):
        return True
    return serving_probe(module).ok


def unservable_reason(module: nn.Module) -> str:
    """Why a subclass of a listed layer type cannot be pruned ('' when it can, or is no such subclass)."""
    base = registered_base(module)
    if base is None or is_prunable_layer(module):
        return ""
    return f"{type(module).__name__} overrides forward and {serving_probe(module).reason}"


def to_dynamic(module: nn.Module) -> Optional[DynamicChannelMixin]:
    """The DynamicOp for ``module`` (sharing its parameters), ``module`` itself if it already is one, or ``None``
    when there is none: an unknown type, an uninitialised lazy layer, or a configuration the op cannot run
    (e.g. a LayerNorm over several dims)."""
    if isinstance(module, DynamicChannelMixin):
        return module
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return None
    kind = layer_kind(module)
    if kind is None or not kind.can_convert(module):
        return None
    if has_own_forward(module, registered_base(module)) and not is_channels_first_layer_norm(module):
        if not serving_probe(module).ok:
            return None
        return served_class(type(module), kind).convert_from(module)
    return kind.convert_from(module)
