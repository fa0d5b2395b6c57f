"""L2MutableChannelUnit: keeps the channels whose output weights have the largest L2 magnitude."""
from torch import Tensor

from .l1 import L1MutableChannelUnit
from .registry import register_unit


@register_unit
class L2MutableChannelUnit(L1MutableChannelUnit):
    """As :class:`L1MutableChannelUnit`, with the root-mean-square of each output row instead of the mean ``|w|``."""

    def row_norm(self, rows: Tensor) -> Tensor:
        """``[R, fan_in] -> [R]``: root mean square."""
        return rows.pow(2).mean(1).sqrt()
