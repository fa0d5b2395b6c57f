"""Which channels a unit gives up first, and how much each is worth, on a scale comparable across units.

A :class:`UnitRanking` is a unit's *drop order* (every channel, the first to go first) and the normalised
importance of each channel in that order. Global allocation compares these scores across units (divided by what a
channel costs), so the scores of different units must be on one scale: see :data:`NORMALIZATIONS`. A loss-based
importance (Taylor: the first-order change of the loss when the channel is zeroed) already is on one scale, the
loss, so it is compared raw and divided by cost: importance per FLOP, as GroupFisher ranks. A magnitude (L1, L2,
BN-scale) is not -- a unit's weight scale is set by its initialisation and normalisation layers, not by how much it
matters -- so it is divided by the unit's mean. ``normalization='auto'`` (the default) picks the one that fits.

``importance`` (what the scores are):

* ``None`` (default): the unit's own ranking. Importance units (L1, L2, BN-scale, Taylor) drop their lowest
  ``channel_importance()`` first, and the allocation is applied through the unit's own choice, so the kept channels
  are exactly the ones the unit would keep. Prefix units (Sequential, OneShot, Slimmable) drop their last channels
  first; their channels are compared with other units by L1 weight magnitude.
* ``'l1'``, ``'l2'``, ``'bn_scale'``: the measure of that unit type, computed for any unit; the kept channels are
  applied by index (``unit.apply_index``), so they are exactly the highest-scoring ones whatever the unit type.
* a callable ``unit -> Tensor [num_channels]`` (higher = more important), applied by index as well.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..units import UNITS
from .errors import BudgetError

IMPORTANCE_MEASURES = {"l1": "L1MutableChannelUnit", "l2": "L2MutableChannelUnit",
                       "bn_scale": "BNScaleMutableChannelUnit"}
NORMALIZATIONS = {
    "auto": "'none' for a loss-based importance learned from gradients (Taylor units' own ranking: already on one "
            "scale, the loss), 'mean' for a magnitude (default)",
    "mean": "divide by the unit's mean score (Torch-Pruning's 'mean'): every unit's scores average 1, so "
            "a unit's weight scale does not decide for it",
    "max": "divide by the unit's largest score: every unit's best channel scores 1",
    "group_size": "divide by the number of layers whose outputs the unit couples: a residual stream summing the "
                  "scores of eight convs is compared per layer with a unit of one conv",
    "none": "raw scores (only meaningful when every unit's measure is on one scale)",
}
Importance = Union[None, str, Callable[[object], Tensor]]


@dataclass
class UnitRanking:
    """``drop_order``: int64 ``[num_channels]``, the channel to give up first first; every consecutive ``groups``
    entries hold one channel of each of the unit's ``groups`` equal blocks, so any prefix of a multiple of
    ``groups`` leaves the blocks balanced. ``scores``: float ``[num_channels]``, normalised importance in drop order.
    ``by_index``: apply the kept channels by index (the ranking is not the unit's own)."""
    drop_order: Tensor
    scores: Tensor
    by_index: bool

    def kept_index(self, count: int) -> Tensor:
        """Sorted int64 ``[count]``: the channels kept when the first ``num_channels - count`` are dropped."""
        return self.drop_order[self.drop_order.numel() - count:].sort().values


def check_importance(importance: Importance) -> None:
    if importance is None or callable(importance) or importance in IMPORTANCE_MEASURES:
        return
    raise BudgetError(f"importance must be None (each unit's own ranking), one of {sorted(IMPORTANCE_MEASURES)} or "
                      f"a callable unit -> Tensor[num_channels]; got {importance!r}")


def check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise BudgetError(f"normalization must be one of {sorted(NORMALIZATIONS)}, got {normalization!r}")


def rank_unit(model: nn.Module, unit, importance: Importance = None, normalization: str = "auto") -> UnitRanking:
    """The drop order and normalised scores of ``unit`` (see the module docstring for ``importance``)."""
    own = None
    if importance is None:
        own = _own_importance(unit)
        if own is None:  # a prefix unit: the last channels go first, compared by L1 magnitude
            scores = _measure(model, unit, "l1")
            order = _prefix_drop_order(unit.num_channels, unit.groups)
        else:
            scores = own
            order = _ascending_drop_order(own, unit.groups)
        by_index = False
    else:
        scores = importance(unit) if callable(importance) else _measure(model, unit, importance)
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (unit.num_channels,):
            raise BudgetError(f"unit {unit.name}: importance must give a tensor of shape ({unit.num_channels},), got "
                              f"{getattr(scores, 'shape', type(scores).__name__)}")
        scores = scores.detach().float().cpu()
        order = _ascending_drop_order(scores, unit.groups)
        by_index = True
    if normalization == "auto":
        normalization = "none" if own is not None and loss_based(unit) else "mean"
    normalised = _normalise(scores, normalization, unit)
    return UnitRanking(drop_order=order, scores=normalised[order], by_index=by_index)


def loss_based(unit) -> bool:
    """Whether ``unit``'s own ranking is learned from gradients (Taylor: ``update_importance`` after backward), an
    estimate of the loss change that compares across units as it is."""
    return callable(getattr(unit, "update_importance", None)) and callable(getattr(unit, "channel_importance", None))


def _own_importance(unit) -> Optional[Tensor]:
    """The unit's ``channel_importance()`` on the CPU, or None for prefix units / nothing to rank by yet."""
    method = getattr(unit, "channel_importance", None)
    if method is None:
        return None
    with torch.no_grad():
        scores = method()
    return None if scores is None else scores.detach().float().cpu()


def _measure(model: nn.Module, unit, name: str) -> Tensor:
    """Scores of ``unit``'s channels by the measure of unit type ``IMPORTANCE_MEASURES[name]`` (ones when that
    measure has nothing to go on, e.g. a unit with no conv / linear outputs)."""
    cls = UNITS[IMPORTANCE_MEASURES[name]]
    scorer = cls(unit.num_channels, output_related=unit.output_related, input_related=unit.input_related,
                 groups=unit.groups, name=unit.name)
    scorer.bind(model)  # resolves the layers; the model is not changed
    with torch.no_grad():
        scores = scorer.channel_importance()
    return torch.ones(unit.num_channels) if scores is None else scores.detach().float().cpu()


def _ascending_drop_order(scores: Tensor, groups: int) -> Tensor:
    """Lowest first within each block, the blocks interleaved (entry ``k * groups + g`` is block g's k-th lowest)."""
    blocks = scores.reshape(groups, -1)
    local = blocks.argsort(dim=1, stable=True)
    offsets = torch.arange(groups).unsqueeze(1) * blocks.shape[1]
    return (local + offsets).t().reshape(-1)


def _prefix_drop_order(num_channels: int, groups: int) -> Tensor:
    """A prefix unit keeps the first channels of each block: the last of every block goes first."""
    block = num_channels // groups
    local = torch.arange(block - 1, -1, -1).expand(groups, block)
    offsets = torch.arange(groups).unsqueeze(1) * block
    return (local + offsets).t().reshape(-1)


def _normalise(scores: Tensor, normalization: str, unit) -> Tensor:
    tiny = torch.finfo(torch.float32).tiny
    if normalization == "mean":
        return scores / scores.mean().clamp_min(tiny)
    if normalization == "max":
        return scores / scores.max().clamp_min(tiny)
    if normalization == "group_size":
        return scores / max(1, len({ref.name for ref in unit.output_related}))
    return scores


__all__ = ["IMPORTANCE_MEASURES", "NORMALIZATIONS", "UnitRanking", "rank_unit", "loss_based", "check_importance",
           "check_normalization"]
