"""Mutable values: a choice among a list of values (mmrazor's ``MutableValue`` / ``OneShotMutableValue``).

pyprune prunes channels and has no layer that reads a mutable value (depth, kernel size); these classes keep
mmrazor's interface so that search-space code and configs that build them run unchanged.
"""
import random
from collections import namedtuple
from typing import Any, List, Optional

from ..registry import MODELS

__all__ = ["MutableValue", "OneShotMutableValue", "DumpChosen"]

DumpChosen = namedtuple("DumpChosen", ["chosen", "meta"])


@MODELS.register_module()
class MutableValue:
    """``value_list`` of values of one type; ``current_choice`` (default: the first) must be one of them."""

    def __init__(self, value_list: List[Any], default_value: Optional[Any] = None, alias: Optional[str] = None,
                 init_cfg=None):
        if len(value_list) == 0:
            raise ValueError("MutableValue: value_list must not be empty")
        types = {type(value) for value in value_list}
        if len(types) > 1:
            raise TypeError(f"MutableValue: all values must have one type, got {sorted(t.__name__ for t in types)}")
        self._value_list = list(value_list)
        self.alias, self.is_fixed = alias, False
        self.current_choice = value_list[0] if default_value is None else default_value

    @property
    def choices(self) -> List[Any]:
        return self._value_list

    @property
    def num_choices(self) -> int:
        return len(self._value_list)

    @property
    def current_choice(self):
        return self._current_choice

    @current_choice.setter
    def current_choice(self, choice) -> None:
        if choice not in self.choices:
            raise ValueError(f"{type(self).__name__}: expected a choice in {self.choices}, got {choice!r}")
        self._current_choice = choice

    def fix_chosen(self, chosen) -> None:
        """Set ``chosen`` (one of the choices) and freeze; fixing twice raises RuntimeError, as in mmrazor."""
        if self.is_fixed:
            raise RuntimeError(f"{type(self).__name__} can not be fixed twice")
        if chosen not in self.choices:
            raise AssertionError(f"{type(self).__name__}: {chosen!r} is not one of {self.choices}")
        self.current_choice = chosen
        self.is_fixed = True

    def dump_chosen(self) -> DumpChosen:
        return DumpChosen(chosen=self.current_choice, meta=dict(all_choices=self.choices))

    def export_chosen(self):
        return self.current_choice

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value_list={self.choices}, current_choice={self.current_choice!r})"


@MODELS.register_module()
class OneShotMutableValue(MutableValue):
    """A mutable value for one-shot search: the values sorted, the largest by default, sampled uniformly."""

    def __init__(self, value_list: List[Any], default_value: Optional[Any] = None, alias: Optional[str] = None,
                 init_cfg=None):
        value_list = sorted(value_list)
        super().__init__(value_list, value_list[-1] if default_value is None else default_value, alias, init_cfg)

    def sample_choice(self):
        return random.choice(self.choices)

    @property
    def max_choice(self):
        return self.choices[-1]

    @property
    def min_choice(self):
        return self.choices[0]
