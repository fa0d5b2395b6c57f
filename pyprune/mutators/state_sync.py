"""Units and layers agree after ``model.load_state_dict``: the units take the selections the state_dict carries.

A prepared model's ``state_dict`` stores each DynamicOp's kept channels (and each channel tensor owner's) as extra
state, so loading it into a freshly prepared full-width model restores the layers' selections. The mutator's units
must then follow, or its choices, configs and exports would describe another subnet. Before anything is loaded we
read, for every unit, the channels each of its layers keeps inside the unit's range; the layers of one unit must
agree (else the state_dict was made for another coupling), and fixed units must keep everything. After the load,
the units adopt those selections.
"""
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..channels import ChannelRef
from ..errors import ConfigError
from ..units import MutableChannelUnit
from ..ops.selection import EXTRA_STATE_KEY as _EXTRA_STATE
from ..units.modules import get_layer, has_one_selection

_MISSING = object()


def _saved_layer_index(state_dict, prefix: str, ref: ChannelRef, layer):
    """The saved global index of the side ``ref`` names (None = all channels), or ``_MISSING`` when the state_dict
    holds no selection for it."""
    if isinstance(layer, ops.ChannelParameter):
        owner, _, attribute = ref.name.rpartition(".")
        state = state_dict.get(f"{prefix}{owner}{'.' if owner else ''}{_EXTRA_STATE}")
        key = f"{attribute}_index"
    else:
        state = state_dict.get(f"{prefix}{ref.name}.{_EXTRA_STATE}")
        key = "out_index" if ref.is_output_channel or has_one_selection(layer) else "in_index"
    if not isinstance(state, dict) or key not in state:
        return _MISSING
    return state[key]


def _unit_channels(layer_index: Optional[Tensor], ref: ChannelRef, num_channels: int, where: str) -> Optional[Tensor]:
    """Unit channels kept according to a layer's global index (sorted int64 on the CPU; None = all of them)."""
    if layer_index is None:
        return None
    index = layer_index.detach().to("cpu", torch.int64)
    inside = index[(index >= ref.start) & (index < ref.end)] - ref.start
    channels = torch.unique_consecutive(torch.div(inside, ref.expand, rounding_mode="floor"))
    if channels.numel() * ref.expand != inside.numel():
        raise ConfigError(f"{where}: {ref.name!r} keeps part of a flattened channel's block")
    return None if channels.numel() == num_channels else channels


def _same(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def saved_unit_selections(model: nn.Module, units: Sequence[MutableChannelUnit], state_dict,
                          prefix: str = "") -> List[Tuple[MutableChannelUnit, Optional[Tensor]]]:
    """(unit, kept channel index or None for all) for every unit whose layers have a selection in ``state_dict``.

    Raises ConfigError naming the unit when its layers disagree or a fixed unit would lose channels; reads only.
    """
    found = []
    for unit in units:
        where = f"unit {unit.name}"
        chosen: Dict[str, Optional[Tensor]] = {}
        for ref in unit.related_refs:
            saved = _saved_layer_index(state_dict, prefix, ref, get_layer(model, ref, where))
            if saved is not _MISSING:
                chosen[ref.name] = _unit_channels(saved, ref, unit.num_channels, where)
        if not chosen:
            continue
        (first_name, first), *others = chosen.items()
        for name, index in others:
            if not _same(first, index):
                raise ConfigError(f"{where}: the state_dict's selections disagree: {first_name!r} keeps "
                                  f"{_count(first, unit)} channels, {name!r} keeps {_count(index, unit)} (the "
                                  f"state_dict was saved from another pruning structure)")
        if not unit.is_mutable and first is not None:
            raise ConfigError(f"{where}: the unit is not prunable ({unit.reason or 'fixed'}) but the state_dict "
                              f"keeps {_count(first, unit)} of its {unit.num_channels} channels")
        if first is not None and first.numel() % unit.groups:
            raise ConfigError(f"{where}: the state_dict keeps {first.numel()} channels, not a multiple of the "
                              f"unit's groups={unit.groups}")
        found.append((unit, first))
    return found


def _count(index: Optional[Tensor], unit: MutableChannelUnit) -> int:
    return unit.num_channels if index is None else int(index.numel())


class SelectionFollower:
    """The ``load_state_dict`` hooks a prepared model carries for its mutator: before the load, read and check the
    state_dict's selections per unit (:func:`saved_unit_selections`); after it, the units adopt them.

    The mutator is held weakly (the model does not keep it alive). A deep copy or pickle of the model carries an
    inert follower: the copy is not the mutator's model (``mutator.export`` deep-copies), and a pickled model
    must not drag the mutator along.
    """

    def __init__(self, mutator):
        self._mutator = weakref.ref(mutator)
        self._pending: List[Tuple[MutableChannelUnit, Optional[Tensor]]] = []

    def __getstate__(self):
        return {}

    def __setstate__(self, state) -> None:
        self._mutator, self._pending = None, []

    def _owner(self):
        return None if self._mutator is None else self._mutator()

    def before_load(self, module: nn.Module, state_dict, prefix: str, *args) -> None:
        owner = self._owner()
        if owner is not None:
            self._pending = saved_unit_selections(module, owner.units, state_dict, prefix)

    def after_load(self, module: nn.Module, incompatible_keys) -> None:
        owner, pending = self._owner(), self._pending
        self._pending = []
        if owner is None or not pending:
            return
        with owner._assembler.deferred():
            for unit, index in pending:
                if not unit.is_mutable:
                    continue
                if index is None:
                    unit.apply_count(unit.num_channels)
                else:
                    unit.apply_index(index.to(unit.device))

