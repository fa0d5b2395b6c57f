"""BNScaleMutableChannelUnit: keeps the channels whose norm layers have the largest |gamma| (network slimming)."""
from typing import Optional

from torch import Tensor

from .. import ops

from .l1 import L1MutableChannelUnit
from .importance import normalized, per_unit_channel
from .registry import register_unit


@register_unit
class BNScaleMutableChannelUnit(L1MutableChannelUnit):
    """Importance of a channel = ``|gamma|`` of the affine norm layers among the output-related layers.

    Several norms in one unit (a residual add) are each scaled to mean 1 and summed. A unit with no affine norm
    (e.g. a linear layer's outputs) falls back to the L1 weight magnitude of :class:`L1MutableChannelUnit`.
    """

    def channel_importance(self) -> Optional[Tensor]:
        total = None
        for ref, module in self.output_layers():
            kind = ops.layer_kind(module)
            scale = None if kind is None else kind.norm_scale(module)
            if scale is None:
                continue
            gamma = scale[ref.start:ref.end].float().abs()
            scores = normalized(per_unit_channel(gamma, self.num_channels))
            total = scores if total is None else total + scores.to(total.device)
        return total if total is not None else super().channel_importance()
