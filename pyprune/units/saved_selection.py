"""The one saved form of a model's channel selection: per unit, the unit channels it keeps.

``{unit name: sorted int64 index [K] of kept unit channels (CPU), or None = every channel}``, one entry per unit of
a mutator (fixed units too: they always hold None). The unit owns its selection; layers only receive the indices
the assembler builds from the units, so this is all a checkpoint needs to give every layer its channels back. Plain
tensors and None only: ``torch.load(weights_only=True)`` reads it. A model's state_dict carries it (see
:mod:`pyprune.mutators.selection_hooks`), and so does an algorithm's checkpoint (``'selections'``).
"""
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor

from ..errors import ChannelSelectionError, ConfigError
from ..ops.selection import check_index

__all__ = ["selection_state", "checked_selections", "apply_selections"]


def selection_state(units: Sequence) -> Dict[str, Optional[Tensor]]:
    """Every unit's kept channels in the saved form (copies on the CPU; reading a device index syncs)."""
    return {unit.name: None if unit.selected_index is None else unit.selected_index.detach().to("cpu", copy=True)
            for unit in units}


def checked_selections(units: Sequence, state, where: str) -> List[Tuple[object, Optional[Tensor]]]:
    """(unit, validated CPU index or None) for every unit, from ``state`` in the saved form. Reads only.

    Raises ConfigError (prefixed by ``where``) when ``state`` is not a dict, names other units than ``units``
    (it was saved from another pruning structure), or a unit's entry is not a sound selection for it: an int64
    1-D index of unique channels in range, balanced over the unit's ``groups``; a unit that is not prunable
    must keep every channel.
    """
    if not isinstance(state, Mapping):
        raise ConfigError(f"{where}: a saved channel selection is a dict {{unit name: int64 index or None}}, got "
                          f"{type(state).__name__}")
    by_name = {unit.name: unit for unit in units}
    missing, unknown = sorted(set(by_name) - set(state)), sorted(set(state) - set(by_name))
    if missing or unknown:
        raise ConfigError(f"{where}: the saved selection's units do not match the mutator's (missing: {missing}, "
                          f"unknown: {unknown}); it was saved from another pruning structure")
    return [(unit, _checked_index(unit, state[name], f"{where}: unit {name}")) for name, unit in by_name.items()]


def _checked_index(unit, index, where: str) -> Optional[Tensor]:
    if index is None:
        return None
    if not isinstance(index, Tensor):
        raise ConfigError(f"{where}: the saved selection is a {type(index).__name__}, expected an int64 index "
                          f"tensor or None")
    try:
        index = check_index(index.detach().cpu(), unit.num_channels, unit.groups, where)
    except ChannelSelectionError as error:
        raise ConfigError(str(error)) from None
    if index is not None and not unit.is_mutable:
        raise ConfigError(f"{where}: the unit is not prunable ({unit.reason or 'fixed'}) but the saved selection "
                          f"keeps {index.numel()} of its {unit.num_channels} channels")
    return index


def apply_selections(checked: Sequence[Tuple[object, Optional[Tensor]]], assembler) -> None:
    """Trusted: the mutable units of ``checked`` (from :func:`checked_selections`) adopt their index; ``assembler``
    (theirs) gives the layers their indices once, at the end. Fixed units already keep every channel."""
    with assembler.deferred():
        for unit, index in checked:
            if not unit.is_mutable:
                continue
            if index is None:
                unit.apply_count(unit.num_channels)
            else:
                unit.apply_index(index.to(unit.device))
