"""The interchange types between the tracer, the units and the mutator: channel ranges and coupled channel groups.

They sit on the ground floor (no pyprune imports) because every layer above speaks them: the tracer produces
:class:`UnitSpec` lists, units are built from them, the mutator reads and writes them as config dicts (mmrazor's
layout: ``{"name", "start", "end", "is_output_channel"}`` per channel range). The one rule that turns a kept
ratio into a channel count, :func:`ratio_to_count`, lives here too, so that layers, units, the mutator, the budget
planner and the command line all keep the same width for the same ratio.
"""
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["ChannelRef", "UnitSpec", "unit_name", "ref_to_dict", "ref_from_dict", "ratio_to_count",
           "RATIO_TOLERANCE"]

# Channels a product ``ratio * num_channels`` may fall short of a whole count and still give it: a ratio written as
# ``k / num_channels`` lands a few ulps below ``k`` (0.57 * 100 = 56.99999999999999), which must not cost a channel.
RATIO_TOLERANCE = 1e-6


@dataclass
class ChannelRef:
    """A range of one module's input or output channels that belongs to a unit (mmrazor's ``Channel``).

    Unit channel ``c`` covers module channels ``start + c*expand ... start + c*expand + expand - 1`` (``expand > 1``
    where a feature map is flattened into a Linear: each channel becomes its ``H*W`` spatial positions).
    ``param_dim`` is set when ``name`` is a channel-sized parameter or buffer that the model's code uses directly
    (ConvNeXt's ``layer_scale``): the tensor's dim that holds the channels (see ``pyprune.ops.ChannelParameter``).
    ``read_by`` is set when the code of an enclosing module reads the layer's tensors directly instead of calling
    it (timm's BEiT: ``F.linear(x, self.qkv.weight, bias)`` in the attention's forward): that module's path (see
    ``pyprune.ops.read_layers``).
    """
    name: str
    start: int
    end: int
    is_output_channel: bool
    expand: int = 1
    param_dim: Optional[int] = None
    read_by: Optional[str] = None

    @property
    def width(self) -> int:
        """Module channels the range spans (``num_channels * expand`` of its unit)."""
        return self.end - self.start


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
        return unit_name(self.output_related, self.input_related, self.num_channels)


def unit_name(output_related: Sequence[ChannelRef], input_related: Sequence[ChannelRef], num_channels: int) -> str:
    """mmrazor's unit name: first related module, its range and the channel count, e.g. ``conv1_(0, 64)_64``."""
    refs = list(output_related) or list(input_related)
    if not refs:
        return f"unit_{num_channels}"
    first = refs[0]
    return f"{first.name}_({first.start}, {first.end})_{num_channels}"


def ref_to_dict(ref: ChannelRef) -> Dict[str, Any]:
    """A ChannelRef in mmrazor's config layout (``expand`` / ``param_dim`` / ``read_by`` only when set)."""
    out = {"name": ref.name, "start": int(ref.start), "end": int(ref.end),
           "is_output_channel": bool(ref.is_output_channel)}
    if ref.expand != 1:
        out["expand"] = int(ref.expand)
    if ref.param_dim is not None:
        out["param_dim"] = int(ref.param_dim)
    if ref.read_by is not None:
        out["read_by"] = str(ref.read_by)
    return out


def ref_from_dict(entry: Mapping[str, Any]) -> ChannelRef:
    """The inverse of :func:`ref_to_dict`; a missing or unknown key raises TypeError (callers name the unit)."""
    return ChannelRef(**entry)


def ratio_to_count(ratio: float, num_channels: int) -> int:
    """The number of channels a kept ``ratio`` of ``num_channels`` names: ``max(1, floor(ratio * num_channels +
    1e-6))``, at most ``num_channels``.

    This is mmrazor's rule for a float choice (``max(1, int(ratio * num_channels))``: truncation, 0.7 of 64 is 44,
    0.5 of 9 is 4) with a tolerance of :data:`RATIO_TOLERANCE` channels for float noise, so ``k / num_channels``
    always gives ``k`` back (plain ``int()`` gives ``k - 1`` when the product lands just below ``k``). Every entry
    point that takes a ratio calls it: ``op.set_out_channels(r)``, a unit's ``current_choice = r``,
    ``mutator.set_global_ratio(r)``, a one-float ``target_pruning_ratio`` (``pyprune prune --target-ratio``) and the
    budget planner's uniform allocation. What a unit does next (``divisor`` / ``min_value`` / ``min_ratio``
    rounding, a multiple of ``groups``) is a second step on the count this returns.

    ratio: the kept fraction, a finite number in (0, 1]. num_channels: the full width, an int >= 1.
    Raises ValueError for anything else (callers check first and name their layer or unit).
    """
    if isinstance(num_channels, bool) or not isinstance(num_channels, numbers.Integral) or num_channels < 1:
        raise ValueError(f"ratio_to_count: num_channels must be an int >= 1, got {num_channels!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio) \
            or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio_to_count: the ratio must be a number in (0, 1], got {ratio!r}")
    return max(1, min(int(num_channels), math.floor(float(ratio) * int(num_channels) + RATIO_TOLERANCE)))
