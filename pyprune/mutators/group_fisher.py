"""GroupFisherChannelMutator: the GroupFisher units of a model, their Fisher information and the global choice of
the next channel to prune (mmrazor's mutator of that name)."""
import math
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError
from ..registry import MODELS
from ..units.group_fisher import GroupFisherChannelUnit
from .channel_mutator import ChannelMutator


def sum_over_ranks(tensors: Sequence[Tensor], group=None) -> List[Tensor]:
    """``tensors`` summed over the ranks of ``group`` (default: the default process group), in one all-reduce of
    their concatenation (one collective per step, not one per unit); the tensors themselves when
    ``torch.distributed`` is not initialised or has one rank. All tensors must share one device and dtype."""
    tensors = list(tensors)
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return tensors
    first = tensors[0]
    odd = [i for i, t in enumerate(tensors) if t.device != first.device or t.dtype != first.dtype]
    if odd:
        raise ConfigError(f"sum_over_ranks: tensor {odd[0]} is {tensors[odd[0]].dtype} on "
                          f"{tensors[odd[0]].device}, tensor 0 is {first.dtype} on {first.device}")
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


@MODELS.register_module()
class GroupFisherChannelMutator(ChannelMutator):
    """A :class:`ChannelMutator` of :class:`~pyprune.units.GroupFisherChannelUnit` (or a subclass) with the
    GroupFisher steps mmrazor's mutator has: record (:meth:`start_record_info` / :meth:`end_record_info`),
    accumulate after each backward (:meth:`update_imp`, one all-reduce for all units under DDP), prune the least
    important channel of the whole model (:meth:`try_prune`) and start again (:meth:`reset_imp`).

    Args: as :class:`ChannelMutator`; ``channel_unit_cfg`` defaults to ``dict(type='GroupFisherChannelUnit')``
    (mmrazor's default: number-mode units, ``normalization_type='flops'``).
    """

    def __init__(self, channel_unit_cfg=None, parse_cfg: Optional[dict] = None, **kwargs):
        super().__init__(dict(type="GroupFisherChannelUnit") if channel_unit_cfg is None else channel_unit_cfg,
                         parse_cfg, **kwargs)
        if not issubclass(self.unit_class, GroupFisherChannelUnit):
            raise ConfigError(f"GroupFisherChannelMutator: channel_unit_cfg type must be GroupFisherChannelUnit (or "
                              f"a subclass), got {self.unit_class.__name__}")

    # ------------------------------------------------------------------------------------------------ recording
    def start_record_info(self) -> None:
        """Hook every mutable unit's layers and record from the next forward on."""
        self._require_prepared()
        for unit in self.mutable_units:
            unit.start_record_fisher_info()

    def end_record_info(self) -> None:
        for unit in self.units:
            unit.end_record_fisher_info()

    def reset_recorded_info(self) -> None:
        for unit in self.units:
            unit.reset_recorded()

    # ------------------------------------------------------------------------------------------------ importance
    @torch.no_grad()
    def update_importance(self) -> None:
        """After ``loss.backward()``: every unit adds this batch's Fisher information, summed over the ranks (one
        all-reduce of all units' vectors), normalised by its channel cost; the records are cleared."""
        units = [u for u in self.mutable_units if u.batch_fisher() is not None]
        for unit, fisher in zip(units, sum_over_ranks([u.batch_fisher() for u in units])):
            unit.accumulate_fisher(fisher)
        self.reset_recorded_info()

    update_imp = update_importance        # mmrazor's names
    reset_imp = ChannelMutator.reset_importance

    def set_channel_flops(self, flops: Dict[str, float]) -> None:
        """``{unit name: FLOPs one channel saves}`` for the units' ``'flops'`` normalisation."""
        for name, value in flops.items():
            self._by_name[name].set_channel_flops(value)

    # ----------------------------------------------------------------------------------------------------- prune
    def prunable_units(self) -> List[GroupFisherChannelUnit]:
        """The mutable units that can lose one more channel (one per group)."""
        return [u for u in self.mutable_units if u.can_prune_channel]

    def try_prune(self) -> Optional[GroupFisherChannelUnit]:
        """Prune the channel with the smallest normalised Fisher information over all prunable units (ties: the
        first unit in model order); returns its unit, or None when no unit can be pruned or a unit's importance
        holds NaN (the step is skipped, as in mmrazor, with a RuntimeWarning naming the unit)."""
        units = self.prunable_units()
        if not units:
            return None
        device = units[0].device
        importances = [u.importance().to(device) for u in units]
        has_nan = torch.stack([imp.isnan().any() for imp in importances]).tolist()  # one sync for all units
        if any(has_nan):
            warnings.warn(f"GroupFisher: unit {units[has_nan.index(True)].name} has NaN in its importance; this "
                          f"pruning step is skipped (lower the learning rate if it repeats)", RuntimeWarning,
                          stacklevel=2)
            return None
        scores = torch.stack([u.prune_score().to(device) for u in units])
        best = int(scores.argmin())
        if math.isinf(float(scores[best])):
            return None  # every candidate saves nothing under its normalisation
        units[best].try_to_prune_min_channel()
        return units[best]


__all__ = ["GroupFisherChannelMutator", "sum_over_ranks"]
