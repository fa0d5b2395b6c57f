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


def selection_state(unit) -> Dict[str, Any]:
    """``{'count': int, 'index': int64 [count] on the CPU}`` for one unit."""
    return {"count": int(unit.active_channels), "index": unit.current_index.detach().cpu().clone()}


def restore_selection(unit, index: Tensor) -> None:
    """Make ``unit`` keep exactly the channels in ``index`` (sorted int64 ``[K]``, from :func:`selection_state`)."""
    unit.apply_index(index.to(device=unit.device, dtype=torch.int64))


def learns_importance(unit) -> bool:
    """Whether ``unit`` accumulates importance over training steps (Taylor), so its state must be saved."""
    return hasattr(unit, "importance_state_dict") and hasattr(unit, "load_importance_state_dict")


def importance_state(unit) -> Optional[Dict[str, Any]]:
    """The accumulated importance of a unit that learns it (``None`` for other units)."""
    return unit.importance_state_dict() if learns_importance(unit) else None


def load_importance_state(unit, state: Optional[Dict[str, Any]]) -> None:
    """Inverse of :func:`importance_state`."""
    if state is not None and learns_importance(unit):
        unit.load_importance_state_dict(state)


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
