"""Reading the per-layer selections of older checkpoints (deprecated: read for one release, then refused).

Older releases saved each DynamicOp's kept channels as its extra state (``<layer>._extra_state = {'out_index',
'in_index'}``, global layer indices or None) and each owner of channel tensors ``{'<attribute>_index'}``. Now the
units save one per-unit entry (:mod:`pyprune.units.saved_selection`). :func:`unit_selection_from_layers` pops the
old entries from a state_dict being loaded and turns them into the per-unit form once, with a DeprecationWarning.
"""
import sys
import warnings
from collections.abc import Mapping
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import ChannelSelectionError, ConfigError
from ..ops.selection import check_index
from ..units.modules import get_layer, has_one_selection, module_channel_count

_EXTRA_STATE = "_extra_state"  # nn.Module's state_dict name for get_extra_state()
_OP_KEYS = {"out_index", "in_index"}


def unit_selection_from_layers(model: nn.Module, units: Sequence, state_dict,
                               prefix: str = "") -> Optional[Dict[str, Optional[Tensor]]]:
    """The per-unit form of the old per-layer entries in ``state_dict`` (popped from it), or None when it has none.

    Per unit, the channels its layers keep inside the unit's range (``expand`` blocks folded); its layers must
    agree (else the state_dict was made for another coupling: ConfigError naming the unit). A unit none of whose
    layers has an entry keeps its current selection.
    """
    entries = _pop_layer_entries(model, state_dict, prefix)
    if not entries:
        return None
    warnings.warn(f"{type(model).__name__}.load_state_dict: the state_dict holds per-layer channel selections "
                  f"('<layer>.{_EXTRA_STATE}', the form of older pyprune releases); they were read into the units. "
                  f"Save the state_dict again to write the per-unit form: the old one will not be read in the next "
                  f"release", DeprecationWarning, stacklevel=callers_stacklevel())
    saved = {}
    for unit in units:
        chosen = {}
        for ref in unit.related_refs:
            where = f"unit {unit.name}: layer {ref.name!r}"
            layer = get_layer(model, ref, where)
            index = _layer_index(entries, ref, layer)
            if index is not None:
                chosen[ref.name] = _unit_channels(index, ref, layer, unit.num_channels, where)
        if not chosen:
            saved[unit.name] = unit.selected_index
            continue
        (first_name, first), *others = chosen.items()
        for name, index in others:
            if not _same(first, index):
                raise ConfigError(f"unit {unit.name}: the state_dict's per-layer selections disagree: {first_name!r} "
                                  f"and {name!r} keep different channels (the state_dict was saved from another "
                                  f"pruning structure)")
        saved[unit.name] = first
    return saved


def _same(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def callers_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside pyprune and torch (the caller's ``load_state_dict`` line)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("pyprune", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def _pop_layer_entries(model: nn.Module, state_dict, prefix: str) -> Dict[str, Mapping]:
    """{module name: its old selection entry} for DynamicOps and channel-tensor owners, popped from ``state_dict``."""
    expected = {name: _OP_KEYS for name, m in model.named_modules() if isinstance(m, ops.DynamicChannelMixin)}
    names = {id(m): name for name, m in model.named_modules()}
    for slot in ops.channel_parameters(model):
        expected.setdefault(names[id(slot.owner)], set()).add(f"{slot.attribute}_index")
    entries = {}
    for name, keys in expected.items():
        key = f"{prefix}{name}{'.' if name else ''}{_EXTRA_STATE}"
        entry = state_dict.get(key)
        if isinstance(entry, Mapping) and set(entry) == keys:
            entries[name] = state_dict.pop(key)
    return entries


def _layer_index(entries: Dict[str, Mapping], ref, layer):
    """The saved entry for the side of ``layer`` that ``ref`` names: a global index, ``False`` = every channel, or
    None when the state_dict has none."""
    if isinstance(layer, ops.ChannelParameter):
        owner, _, attribute = ref.name.rpartition(".")
        entry, key = entries.get(owner), f"{attribute}_index"
    else:
        entry = entries.get(ref.name)
        key = "out_index" if ref.is_output_channel or has_one_selection(layer) else "in_index"
    if entry is None:
        return None
    return False if entry[key] is None else entry[key]


def _unit_channels(index, ref, layer, num_channels: int, where: str) -> Optional[Tensor]:
    """Unit channels kept according to a layer's global index (sorted int64 on the CPU; None = all of them)."""
    if index is False:
        return None
    if not isinstance(index, Tensor):
        raise ConfigError(f"{where}: the saved index is a {type(index).__name__}, expected an int64 tensor")
    width = module_channel_count(layer, ref.is_output_channel or has_one_selection(layer), ref.name)
    try:
        index = check_index(index.detach().cpu(), width, 1, where)
    except ChannelSelectionError as error:
        raise ConfigError(str(error)) from None
    if index is None:
        return None
    inside = index[(index >= ref.start) & (index < ref.end)] - ref.start
    channels = torch.unique_consecutive(torch.div(inside, ref.expand, rounding_mode="floor"))
    if channels.numel() * ref.expand != inside.numel():
        raise ConfigError(f"{where}: keeps part of a flattened channel's block")
    return None if channels.numel() == num_channels else channels
