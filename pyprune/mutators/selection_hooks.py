"""A prepared model's state_dict carries its units' selection; loading one makes the units take it.

The unit owns the selection: layers only receive the indices the assembler builds from the units. So preparing a
model puts three hooks on its root, and loading goes one way (state_dict -> units -> layers):

* state_dict: ONE entry, ``<prefix>_pyprune_selection``, in the per-unit form of
  :mod:`pyprune.units.saved_selection`;
* load_state_dict, before anything is copied (the root's pre-hook runs first): pop that entry and validate it for
  every unit, so a bad one raises ConfigError naming the unit with model and units untouched;
* load_state_dict, after everything is loaded: the units adopt it (one assembler pass pushes the layers' indices).

A state_dict without the entry (a plain model's) leaves the selection as it is; one with the per-layer entries of
older checkpoints is converted once (:mod:`pyprune.mutators.legacy_selection`).

The hooks' :class:`SelectionFollower` holds the units and their assembler (not the mutator), so the model saves and
loads its selection on its own: when the mutator is gone, and in a deep copy or an unpickled model, which carry
their own copies of the units bound to their own layers (a copy's loads do not reach the mutator's units).
"""
import functools
from typing import List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ..units.saved_selection import apply_selections, checked_selections, selection_state
from .legacy_selection import unit_selection_from_layers

SELECTION_KEY = "_pyprune_selection"
_FOLLOWER = "_pyprune_selection_follower"  # model.__dict__ key: the follower whose hooks the root carries


class SelectionFollower:
    """The state_dict / load_state_dict hooks of a prepared model, for its ``units`` and their ``assembler``."""

    def __init__(self, units: Sequence, assembler):
        self.units, self.assembler = list(units), assembler
        self._pending: List[Tuple[object, Optional[Tensor]]] = []

    def save(self, module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
        if self.units:
            state_dict[prefix + SELECTION_KEY] = selection_state(self.units)

    def before_load(self, module: nn.Module, state_dict, prefix: str, *args) -> None:
        self._pending = []
        if not self.units:
            return
        key = prefix + SELECTION_KEY
        saved = state_dict[key] if key in state_dict else unit_selection_from_layers(module, self.units,
                                                                                    state_dict, prefix)
        if saved is not None:  # None: a plain model's state_dict, the current selection stays
            self._pending = checked_selections(self.units, saved, f"state_dict entry {key!r}")
            state_dict.pop(key, None)

    def after_load(self, module: nn.Module, incompatible_keys) -> None:
        pending, self._pending = self._pending, []
        if pending:
            apply_selections(pending, self.assembler)


def install(model: nn.Module, units: Sequence, assembler) -> SelectionFollower:
    """Make ``model``'s state_dict carry the selection of ``units`` and its load_state_dict give it back to them
    (hooks on the root; a follower installed there by a previous preparation is released)."""
    release(model)
    follower = SelectionFollower(units, assembler)
    model.__dict__[_FOLLOWER] = follower
    # a partial, not the bound method: torch marks a state_dict hook with an attribute, which a method can't take
    model.register_state_dict_post_hook(functools.partial(SelectionFollower.save, follower))
    model.register_load_state_dict_pre_hook(follower.before_load)
    model.register_load_state_dict_post_hook(follower.after_load)
    return follower


def release(model: nn.Module) -> None:
    """Stop ``model``'s follower, if any (its hooks stay, doing nothing): the model was exported to plain layers, or
    another mutator prepares it now."""
    follower = model.__dict__.pop(_FOLLOWER, None)
    if follower is not None:
        follower.units, follower.assembler, follower._pending = [], None, []
