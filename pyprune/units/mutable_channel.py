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
"""
import math
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..channels import ratio_to_count
from ..errors import ChannelSelectionError
from ..registry import MODELS

__all__ = ["SimpleMutableChannel", "SquentialMutableChannel", "SequentialMutableChannel", "OneShotMutableChannel",
           "ExpandedMutableChannel"]


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
        self.mask: Tensor = torch.ones(num_channels, dtype=torch.bool)

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
        """Set ``chosen`` (if given) and freeze: fixing twice is an error, as in mmrazor."""
        if self.is_fixed:
            raise AttributeError(f"{type(self).__name__} is fixed already; fix_chosen cannot be called again")
        if chosen is not None:
            self.current_choice = chosen
        self.is_fixed = True

    def export_chosen(self) -> int:
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

    @property
    def current_mask(self) -> Tensor:
        return self.source.current_mask.repeat_interleave(self.expand_ratio)

    def __repr__(self) -> str:
        return f"ExpandedMutableChannel({self.source!r} x {self.expand_ratio})"
