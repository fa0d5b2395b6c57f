"""How a unit turns a requested width into a kept channel count (divisor, minimum, groups).

A ratio first becomes a count by :func:`pyprune.channels.ratio_to_count` (the one rule, re-exported here so
``pyprune.units.ratio_to_count`` keeps working); :func:`kept_channel_count` is the second step, the unit's own
rounding of that count.
"""
import math
from typing import Optional

from ..channels import ratio_to_count

__all__ = ["make_divisible", "ratio_to_count", "kept_channel_count"]


def make_divisible(value: float, divisor: int, min_value: Optional[int] = None, min_ratio: float = 0.9) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (mmrazor's rule and defaults).

    The result is at least ``min_value`` (default: ``divisor``) and at least one ``divisor`` (rounding never
    reaches zero); when rounding down lost more than ``1 - min_ratio`` of ``value``, one more ``divisor`` is added
    (so ``min_ratio=0.9`` never keeps fewer than 90 % of what was asked).
    """
    rounded = max(min_value or divisor, divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < min_ratio * value:
        rounded += divisor
    return rounded


def kept_channel_count(value: float, num_channels: int, divisor: int = 1, min_value: int = 1,
                       min_ratio: float = 0.0, groups: int = 1) -> int:
    """The number of channels a unit keeps when ``value`` (a count, may be fractional) is asked for.

    ``make_divisible`` first, then clamped to ``[1, num_channels]`` (the full width is allowed even when it is not
    a multiple of ``divisor``), then rounded to a multiple of ``groups``
    (at least one channel per group) so every group keeps the same count.
    """
    kept = make_divisible(value, divisor, min_value, min_ratio)
    kept = min(max(kept, 1), num_channels)
    if groups > 1:
        per_group = max(1, math.floor(kept / groups + 0.5))
        kept = min(per_group * groups, num_channels)
    return kept
