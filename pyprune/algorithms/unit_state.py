"""Saving, restoring and synchronizing the state that lives in channel units rather than in the model.

A unit's selection (which channels are kept) and, for units that learn importance from gradients, its accumulated
importance are not parameters of the model, so a checkpoint of the model alone cannot resume a pruning run. These
helpers put them in plain dicts of tensors / ints (loadable with ``torch.load(weights_only=True)``) and make every
rank of a distributed run agree on them.
"""
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError


def selection_state(unit) -> Dict[str, Any]:
    """``{'count': int, 'index': int64 [count] on the CPU}`` for one unit."""
    return {"count": int(unit.active_channels), "index": unit.current_index.detach().cpu().clone()}


def restore_selection(unit, index: Tensor) -> None:
    """Make ``unit`` keep exactly the channels in ``index`` (sorted int64 ``[K]``), then check that it does.

    Units choose their channels themselves (a prefix, or the top-K of an importance measure); to reproduce a saved
    selection of an importance unit we let it rank by a score that is 1 on the saved channels and 0 elsewhere, so
    its own ``top-K`` picks exactly those. (A unit that offers ``apply_index(index)`` is asked directly.)
    """
    index = index.to(device=unit.current_index.device, dtype=torch.int64)
    count = int(index.numel())
    if hasattr(unit, "apply_index"):
        unit.apply_index(index)
    elif count == unit.num_channels:
        unit.apply_count(count)
    elif hasattr(unit, "channel_importance"):
        scores = torch.zeros(unit.num_channels, device=index.device).index_fill_(0, index, 1.0)
        unit.channel_importance = lambda: scores  # instance attribute: shadows the method for this one call
        try:
            unit.apply_count(count)
        finally:
            del unit.channel_importance
    else:
        unit.apply_count(count)
    if not torch.equal(unit.current_index, index):
        raise ConfigError(f"unit {unit.name}: cannot restore the saved channel selection ({count} of "
                          f"{unit.num_channels} channels); a {type(unit).__name__} chooses other channels for it")


def learns_importance(unit) -> bool:
    """Whether ``unit`` accumulates importance over training steps (Taylor), so its state must be saved."""
    return hasattr(unit, "update_importance") and hasattr(unit, "reset_importance")


def importance_state(unit) -> Optional[Dict[str, Any]]:
    """The accumulated importance of a unit that learns it (``None`` for other units)."""
    if not learns_importance(unit):
        return None
    if hasattr(unit, "importance_state_dict"):
        return unit.importance_state_dict()
    scores = unit.channel_importance()
    return {"importance": None if scores is None else scores.detach().cpu().clone(),
            "num_updates": int(getattr(unit, "num_updates", 0))}


def load_importance_state(unit, state: Optional[Dict[str, Any]]) -> None:
    """Inverse of :func:`importance_state`."""
    if state is None or not learns_importance(unit):
        return
    if hasattr(unit, "load_importance_state_dict"):
        unit.load_importance_state_dict(state)
        return
    unit.reset_importance()
    if state.get("importance") is not None:
        # TaylorMutableChannelUnit keeps its accumulator in ``_importance`` / ``num_updates`` and has no public
        # setter yet; this is the one place that relies on those names.
        unit._importance = state["importance"].to(unit.current_index.device)
        unit.num_updates = int(state.get("num_updates", 0))


def distributed_world() -> int:
    """Number of ranks of the default process group (1 when ``torch.distributed`` is not in use)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_selections(units, src: int = 0) -> int:
    """Make every rank keep the channels rank ``src`` keeps; returns how many units this rank had to change.

    Every rank computes the same counts (the schedule is deterministic), so the index tensors have the same shape
    everywhere; only the ranking inside an importance unit could, in principle, differ (e.g. ties broken by tiny
    floating-point differences), and this removes that possibility.
    """
    if distributed_world() == 1:
        return 0
    changed = 0
    for unit in units:
        local = unit.current_index
        reference = local.clone()
        dist.broadcast(reference, src)
        if not torch.equal(reference, local):
            restore_selection(unit, reference)
            changed += 1
    return changed
