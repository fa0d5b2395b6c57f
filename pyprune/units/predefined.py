"""Units of a model built from DynamicOps with registered mutables (``parse_cfg=dict(type='Predefined')``).

Every distinct mutable channel registered on the model's DynamicOps (``op.register_mutable_attr('out_channels',
mutable)``, see :mod:`pyprune.ops.mutable_attrs`) becomes one unit: the layers it drives on their output side are
its ``output_related``, on their input side its ``input_related``; ``mutable.expand_mutable_channel(k)`` on a layer
makes that layer's range ``k`` features per unit channel. A side holding a
:class:`~pyprune.units.mutable_channel_container.MutableChannelContainer` gives each registered channel its
``[start, end)`` range of that side (ranges nobody registered are in no unit: they keep their channels). Norms and
depthwise convs count once (on the output side); non-channel attributes (a kernel size, a depth) are not units.
"""
from typing import Any, Dict, List, Tuple

from torch import nn

from .. import ops
from ..channels import ChannelRef, UnitSpec
from ..errors import ConfigError
from .mutable_channel import ExpandedMutableChannel
from .mutable_channel_container import MutableChannelContainer

__all__ = ["predefined_units"]


def predefined_units(model: nn.Module) -> List[Tuple[UnitSpec, Any]]:
    """``(spec, mutable)`` per distinct mutable, in the order the model's modules first name them. A model with no
    registered mutable raises ConfigError (the parse type needs them)."""
    found: Dict[int, Tuple[Any, List[ChannelRef], List[ChannelRef]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, ops.DynamicChannelMixin):
            continue
        shared = type(module).shares_selection(module)
        for attr, mutable in module.mutable_attrs.items():
            if attr not in ("out_channels", "in_channels"):
                continue  # a kernel size or other value: no channels
            is_output = attr == "out_channels"
            if shared and not is_output:
                continue  # a norm's input side is its output side
            width = type(module).channel_counts(module)[0 if is_output else 1]
            ranges = list(mutable.ranges()) if isinstance(mutable, MutableChannelContainer) else [(0, width, mutable)]
            for start, end, channel in ranges:
                source, expand = (channel.source, channel.expand_ratio) \
                    if isinstance(channel, ExpandedMutableChannel) else (channel, 1)
                entry = found.setdefault(id(source), (source, [], []))
                entry[1 if is_output else 2].append(ChannelRef(name, start, end, is_output, expand))
    if not found:
        raise ConfigError("parse_cfg type 'Predefined' needs a model whose DynamicOps have mutables registered "
                          "(op.register_mutable_attr('out_channels', mutable)); this model has none")
    return [(UnitSpec(source.num_channels, outputs, inputs), source) for source, outputs, inputs in found.values()]
