"""L1MutableChannelUnit: keeps the channels whose output weights have the largest L1 magnitude."""
from typing import Optional

from torch import Tensor

from .. import ops

from .importance import ImportanceMutableChannelUnit, normalized, per_unit_channel
from .registry import register_unit


def output_weight_rows(ref, module) -> Optional[Tensor]:
    """The rows ``[end - start, fan_in]`` of the weight that ``ref`` covers (float), for layers whose kind has
    importance rows (conv / linear); None for others."""
    kind = ops.layer_kind(module)
    rows = None if kind is None else kind.importance_rows(module)
    return None if rows is None else rows[ref.start:ref.end].float()


@register_unit
class L1MutableChannelUnit(ImportanceMutableChannelUnit):
    """Importance of a channel = its output weights' magnitude, summed over the coupled conv / linear layers.

    Per layer: the mean ``|w|`` of each output row (the mean, not the sum, so fan-in does not matter), rows of one
    unit channel (``expand``) summed, then scaled to mean 1 over the unit's channels, so that every coupled layer
    has the same say whatever its weight scale. Recomputed whenever the choice is set.
    """

    def row_norm(self, rows: Tensor) -> Tensor:
        """``[R, fan_in] -> [R]``: mean absolute value."""
        return rows.abs().mean(1)

    def channel_importance(self) -> Optional[Tensor]:
        total = None
        for ref, module in self.output_layers():
            rows = output_weight_rows(ref, module)
            if rows is None:
                continue
            scores = normalized(per_unit_channel(self.row_norm(rows), self.num_channels))
            total = scores if total is None else total + scores.to(total.device)
        return total
