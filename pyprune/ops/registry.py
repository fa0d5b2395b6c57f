"""Which DynamicOp replaces which torch layer."""
from typing import Dict, Optional, Type

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .attention import WINDOW_ATTENTION_OPS, DynamicMultiheadAttention
from .base import DynamicChannelMixin
from .batchnorm import DynamicBatchNorm1d, DynamicBatchNorm2d
from .conv import DynamicConv2d
from .groupnorm import DynamicGroupNorm
from .layernorm import DynamicLayerNorm
from .linear import DynamicLinear

__all__ = ["DYNAMIC_OPS", "to_dynamic"]

# torch layer type -> DynamicOp type. Subclasses of these map through their nearest listed base (MRO order).
DYNAMIC_OPS: Dict[Type[nn.Module], Type[DynamicChannelMixin]] = {
    nn.Conv2d: DynamicConv2d,
    nn.Linear: DynamicLinear,
    nn.BatchNorm1d: DynamicBatchNorm1d,
    nn.BatchNorm2d: DynamicBatchNorm2d,
    nn.LayerNorm: DynamicLayerNorm,
    nn.GroupNorm: DynamicGroupNorm,
    nn.MultiheadAttention: DynamicMultiheadAttention,
    **WINDOW_ATTENTION_OPS,  # torchvision's Swin attention (v1, v2), when torchvision is installed
}


def to_dynamic(module: nn.Module) -> Optional[DynamicChannelMixin]:
    """The DynamicOp for ``module`` (sharing its parameters), ``module`` itself if it already is one, or ``None``
    when there is none: an unknown type, an uninitialised lazy layer, or a configuration the op cannot run
    (e.g. a LayerNorm over several dims)."""
    if isinstance(module, DynamicChannelMixin):
        return module
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return None
    for base in type(module).__mro__:
        dynamic_type = DYNAMIC_OPS.get(base)
        if dynamic_type is not None:
            return dynamic_type.convert_from(module) if dynamic_type.can_convert(module) else None
    return None
