"""Mutable channels: a channel mask as its own object, as mmrazor's models with predefined dynamic ops use them.

In pyprune a unit owns its selection (an index, see :class:`~pyprune.units.MutableChannelUnit`); these classes exist
so that a model written against mmrazor's API - dynamic layers with ``register_mutable_attr('out_channels',
mutable)`` - can be parsed (``parse_cfg=dict(type='Predefined')``): every distinct mutable becomes one unit, of
``mutable.num_channels`` channels, starting at the mutable's current choice. After ``prepare_from_supernet`` the unit
keeps its mutable's ``mask`` in step with its selection; set widths through the mutator or the units.

* :class:`SimpleMutableChannel`: the choice *is* a bool mask ``[num_channels]``.
* :class:`SquentialMutableChannel` (mmrazor's spelling; ``SequentialMutableChannel`` too): the choice is a count
  (``choice_mode='number'``) or a ratio; it keeps the first channels.
* :class:`OneShotMutableChannel`: a sequential channel whose choice must be one of ``candidate_choices``.
* ``mutable.expand_mutable_channel(k)``: the same choice seen by a layer that has ``k`` features per channel
  (flatten -> Linear); register it on that layer.
* :class:`~pyprune.units.mutable_channel_container.MutableChannelContainer`: several of these on ranges of one layer
  side.

``dump_chosen()`` / ``fix_chosen()`` / ``export_chosen()`` answer as mmrazor's do: ``DumpChosen(chosen=<activated
channel count>, meta={'max_channels': num_channels})``; a derived (expanded) channel dumps its mask with
``meta=None`` and cannot be fixed itself (a warning, as mmrazor logs).

A hand-built DynamicOp follows the mutables registered on it (:mod:`pyprune.ops.mutable_attrs`): every new mask is
pushed to the layers that registered the channel (weakly held), so a forward or an ``export()`` after
``mutable.current_choice = c`` runs at that width. Set choices through ``current_choice`` (or assign ``mask``); an
in-place edit of the mask tensor is not seen.
"""
import copy
import math
import warnings
import weakref
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..channels import ratio_to_count
from ..errors import ChannelSelectionError
from ..registry import MODELS
from .mutable_value import DumpChosen

__all__ = ["SimpleMutableChannel", "SquentialMutableChannel", "SequentialMutableChannel", "OneShotMutableChannel",
           "ExpandedMutableChannel", "MaskFollowers", "FixedTwiceError"]


class FixedTwiceError(AttributeError, AssertionError):
    """``fix_chosen`` on a mutable channel that is fixed already. mmrazor's base channel raises AttributeError
    there and its sequential channel fails an assert, so this is both."""


class MaskFollowers:
    """The objects (DynamicOps, containers) that read a mutable channel's mask, held weakly: each is told
    ``follower._mutable_changed()`` after the mask changed (a collected follower is dropped)."""

    def __init__(self):
        self._refs: List[weakref.ref] = []

    def add(self, follower) -> None:
        if not any(ref() is follower for ref in self._refs):
            self._refs.append(weakref.ref(follower))

    def __deepcopy__(self, memo) -> "MaskFollowers":
        """The copies of the followers: a deep-copied model's layers follow its copied channels, not the originals
        (a follower outside what is copied is copied too and, held weakly, dropped)."""
        new = MaskFollowers()
        memo[id(self)] = new
        for ref in self._refs:
            follower = ref()
            if follower is not None:
                new.add(copy.deepcopy(follower, memo))
        return new

    def notify(self) -> None:
        alive = []
        for ref in self._refs:
            follower = ref()
            if follower is not None:
                alive.append(ref)
                follower._mutable_changed()
        self._refs = alive


@MODELS.register_module()
class SimpleMutableChannel:
    """A mask over ``num_channels`` channels; the choice is the bool mask ``[num_channels]`` itself."""

    def __init__(self, num_channels: int, **kwargs):
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ChannelSelectionError(f"{type(self).__name__}: num_channels must be a positive int, got "
                                        f"{num_channels!r}")
        self.num_channels = num_channels
        self.name = ""
        self.is_fixed = False
        self._followers = MaskFollowers()
        self._mask: Tensor = torch.ones(num_channels, dtype=torch.bool)

    @property
    def mask(self) -> Tensor:
        """Bool ``[num_channels]``: the kept channels."""
        return self._mask

    @mask.setter
    def mask(self, mask: Tensor) -> None:
        self._mask = mask
        self._followers.notify()

    def add_follower(self, follower) -> None:
        """Tell ``follower._mutable_changed()`` whenever the mask changes (see :class:`MaskFollowers`)."""
        self._followers.add(follower)

    @property
    def current_choice(self):
        return self.mask.clone()

    @current_choice.setter
    def current_choice(self, choice) -> None:
        mask = torch.as_tensor(choice).to(torch.bool).flatten()
        if mask.numel() != self.num_channels or not bool(mask.any()):
            raise ChannelSelectionError(f"{type(self).__name__}: a mask choice must be {self.num_channels} bools "
                                        f"with at least one True")
        self.mask = mask

    @property
    def current_mask(self) -> Tensor:
        """Bool ``[num_channels]``."""
        return self.mask

    @property
    def activated_channels(self) -> int:
        return int(self.mask.sum())

    def fix_chosen(self, chosen=None) -> None:
        """Set ``chosen`` (if given) and freeze. Fixing twice raises :class:`FixedTwiceError` (an
        AttributeError, as mmrazor's ``BaseMutableChannel`` raises; here before anything is set)."""
        if self.is_fixed:
            raise FixedTwiceError(f"{type(self).__name__} is fixed already; fix_chosen cannot be called again")
        if chosen is not None:
            self.current_choice = chosen
        self.is_fixed = True

    def dump_chosen(self) -> DumpChosen:
        """``DumpChosen(chosen=activated channel count, meta={'max_channels': num_channels})``."""
        return DumpChosen(chosen=self.export_chosen(), meta=dict(max_channels=self.num_channels))

    def export_chosen(self) -> int:
        """The activated channel count."""
        return self.activated_channels

    def expand_mutable_channel(self, expand_ratio: int) -> "ExpandedMutableChannel":
        """This channel as seen by a layer with ``expand_ratio`` features per channel (flatten -> Linear)."""
        return ExpandedMutableChannel(self, expand_ratio)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_channels={self.num_channels}, activated_channels=" \
               f"{self.activated_channels})"


@MODELS.register_module()
class SquentialMutableChannel(SimpleMutableChannel):
    """Keeps the first channels; the choice is a count (``choice_mode='number'``) or a ratio (``'ratio'``). A float
    choice is always a ratio and an int always a count, as in mmrazor; ``current_choice`` reads back in the mode."""

    def __init__(self, num_channels: int, choice_mode: str = "number", **kwargs):
        super().__init__(num_channels, **kwargs)
        if choice_mode not in ("number", "ratio"):
            raise ChannelSelectionError(f"{type(self).__name__}: choice_mode must be 'number' or 'ratio', got "
                                        f"{choice_mode!r}")
        self.choice_mode = choice_mode

    @property
    def is_num_mode(self) -> bool:
        return self.choice_mode == "number"

    @property
    def current_choice(self) -> Union[int, float]:
        count = self.activated_channels
        return count if self.is_num_mode else count / self.num_channels

    @current_choice.setter
    def current_choice(self, choice: Union[int, float]) -> None:
        count = self._to_count(choice)
        mask = torch.zeros(self.num_channels, dtype=torch.bool)
        mask[:count] = True
        self.mask = mask

    def fix_chosen(self, chosen=...) -> None:
        """Set ``chosen`` (default: the current choice) and freeze. Fixing twice raises :class:`FixedTwiceError` (an
        AssertionError too, as mmrazor's ``SquentialMutableChannel`` asserts; here before anything is set)."""
        if self.is_fixed:
            raise FixedTwiceError(f"{type(self).__name__} is fixed already; fix_chosen cannot be called again")
        self.current_choice = self.current_choice if chosen is ... else chosen
        self.is_fixed = True

    def _to_count(self, choice) -> int:
        if isinstance(choice, float) and math.isfinite(choice) and 0.0 < choice <= 1.0:
            choice = ratio_to_count(choice, self.num_channels)
        if not isinstance(choice, int) or isinstance(choice, bool) or not 1 <= choice <= self.num_channels:
            raise ChannelSelectionError(f"{type(self).__name__}: a choice must be a count in [1, "
                                        f"{self.num_channels}] or a ratio in (0, 1], got {choice!r}")
        return choice


SequentialMutableChannel = SquentialMutableChannel  # the spelling pyprune would use; mmrazor's is the class name


class OneShotMutableChannel(SquentialMutableChannel):
    """A sequential channel whose choice must be one of ``candidate_choices`` (default: the full width)."""

    def __init__(self, num_channels: int, candidate_choices: Optional[Sequence[Union[int, float]]] = None,
                 choice_mode: str = "number", **kwargs):
        super().__init__(num_channels, choice_mode, **kwargs)
        candidates = sorted(candidate_choices or [num_channels if self.is_num_mode else 1.0])
        for choice in candidates:
            self._to_count(choice)
        self.candidate_choices: List[Union[int, float]] = candidates

    @SquentialMutableChannel.current_choice.setter
    def current_choice(self, choice) -> None:
        if choice not in self.candidate_choices:
            raise ChannelSelectionError(f"{type(self).__name__}: choice {choice!r} is not one of the candidates "
                                        f"{self.candidate_choices}")
        SquentialMutableChannel.current_choice.fset(self, choice)

    @property
    def max_choice(self):
        return self.candidate_choices[-1]

    @property
    def min_choice(self):
        return self.candidate_choices[0]


MODELS.register_module(module=OneShotMutableChannel)


class ExpandedMutableChannel:
    """A mutable channel seen by a layer that has ``expand_ratio`` features per channel: its mask repeats every
    entry ``expand_ratio`` times (``[num_channels * expand_ratio]``)."""

    def __init__(self, source: SimpleMutableChannel, expand_ratio: int):
        if not isinstance(expand_ratio, int) or expand_ratio < 1:
            raise ChannelSelectionError(f"expand_mutable_channel: expand_ratio must be an int >= 1, got "
                                        f"{expand_ratio!r}")
        self.source, self.expand_ratio = source, expand_ratio
        self.num_channels = source.num_channels * expand_ratio
        self.name = ""

    @property
    def current_mask(self) -> Tensor:
        """Bool ``[num_channels * expand_ratio]``."""
        return self.source.current_mask.repeat_interleave(self.expand_ratio)

    @property
    def current_choice(self) -> Tensor:
        """The mask (mmrazor's derived channel has its mask as its choice); it cannot be set."""
        return self.current_mask

    @current_choice.setter
    def current_choice(self, choice) -> None:
        raise RuntimeError(f"{self!r}: the choice of a derived mutable channel cannot be set; set its source's")

    @property
    def activated_channels(self) -> int:
        return self.source.activated_channels * self.expand_ratio

    @property
    def is_fixed(self) -> bool:
        """Whether the source channel is fixed."""
        return self.source.is_fixed

    def add_follower(self, follower) -> None:
        self.source.add_follower(follower)

    def fix_chosen(self, chosen=None) -> None:
        """No effect (the source decides), with a warning, as mmrazor's derived mutables."""
        warnings.warn(f"{self!r}: fix_chosen on a derived mutable channel has no effect; fix its source",
                      stacklevel=2)

    def dump_chosen(self) -> DumpChosen:
        """``DumpChosen(chosen=mask, meta=None)`` with a warning (its value depends on the source), as mmrazor."""
        warnings.warn(f"{self!r}: dump_chosen of a derived mutable channel depends on its source", stacklevel=2)
        return DumpChosen(chosen=self.export_chosen(), meta=None)

    def export_chosen(self) -> Tensor:
        return self.current_choice

    def __repr__(self) -> str:
        return f"ExpandedMutableChannel({self.source!r} x {self.expand_ratio})"
