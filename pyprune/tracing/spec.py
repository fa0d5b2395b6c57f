"""What the tracer produces: coupled channel groups described by the module ranges they touch (mmrazor layout)."""
import warnings
from dataclasses import dataclass, field
from typing import List, Optional


class PruningTraceWarning(UserWarning):
    """An op the tracer cannot map to channels; the channel groups it touches are fixed (not pruned)."""


@dataclass
class ChannelRef:
    """A range of one module's input or output channels that belongs to a unit (mmrazor's ``Channel``).

    Unit channel ``c`` covers module channels ``start + c*expand ... start + c*expand + expand - 1`` (``expand > 1``
    where a feature map is flattened into a Linear: each channel becomes its ``H*W`` spatial positions).
    ``param_dim`` is set when ``name`` is a channel-sized parameter or buffer that the model's code uses directly
    (ConvNeXt's ``layer_scale``): the tensor's dim that holds the channels (see ``pyprune.ops.ChannelParameter``).
    """
    name: str
    start: int
    end: int
    is_output_channel: bool
    expand: int = 1
    param_dim: Optional[int] = None


@dataclass
class UnitSpec:
    """One group of coupled channels: the layers whose output / input channels must share one selection."""
    num_channels: int
    output_related: List[ChannelRef] = field(default_factory=list)
    input_related: List[ChannelRef] = field(default_factory=list)
    groups: int = 1          # a selection must keep the same count in each of `groups` equal blocks
    fixed: bool = False      # never pruned (model input / output, an op we cannot map, user-fixed)
    reason: str = ""

    @property
    def name(self) -> str:
        first = (self.output_related or self.input_related)[0]
        return f"{first.name}_({first.start}, {first.end})_{self.num_channels}"


def warn_untraceable(message: str) -> None:
    warnings.warn(message, PruningTraceWarning, stacklevel=3)
