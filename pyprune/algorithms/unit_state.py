"""Restoring and synchronizing the state that lives in channel units rather than in the model.

For units that learn importance from gradients, the accumulated importance is not a parameter of the model, so a
checkpoint of the model alone cannot resume a pruning run; these helpers put it in plain dicts of tensors / ints
(loadable with ``torch.load(weights_only=True)``). The selection itself is saved in the one per-unit form
(:mod:`pyprune.units.saved_selection`). Every rank of a distributed run is made to agree on the selections.
"""
import warnings
from collections.abc import Mapping
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..mutators.legacy_selection import callers_stacklevel


def restore_selection(unit, index: Tensor) -> None:
    """Make ``unit`` keep exactly the channels in ``index`` (sorted int64 ``[K]``)."""
    unit.apply_index(index.to(device=unit.device, dtype=torch.int64))


def selections_of_old_checkpoint(units, saved):
    """An algorithm checkpoint's ``'selections'`` in the per-unit form. Older checkpoints held ``{'count', 'index'}``
    per mutable unit only: read for one release (DeprecationWarning); fixed units then keep every channel."""
    if not isinstance(saved, Mapping) or not any(isinstance(entry, Mapping) for entry in saved.values()):
        return saved
    warnings.warn("the algorithm checkpoint holds selections as {'count', 'index'} per unit (the form of older "
                  "pyprune releases); save it again to write the per-unit form: the old one will not be read in the "
                  "next release", DeprecationWarning, stacklevel=callers_stacklevel())
    converted = {name: entry.get("index") if isinstance(entry, Mapping) else entry for name, entry in saved.items()}
    for unit in units:
        if not unit.is_mutable:
            converted.setdefault(unit.name, None)
    return converted


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
