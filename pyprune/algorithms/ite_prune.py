"""ItePruneAlgorithm: prune step by step during training, towards a target width (mmrazor's schedule)."""
import math
import numbers
from collections.abc import Mapping
from typing import Any, Dict, Union

from torch import nn

from ..errors import ChannelSelectionError, ConfigError
from ..registry import MODELS
from .base import BaseAlgorithm
from .unit_state import broadcast_selections

Target = Union[float, Mapping]


@MODELS.register_module()
class ItePruneAlgorithm(BaseAlgorithm):
    """Iterative pruning: ``prune_times`` steps, ``step_freq`` iterations (or epochs) apart.

    Args:
        model, mutator: see :class:`BaseAlgorithm`.
        target_pruning_ratio: the width to reach, as mmrazor means it (the *kept* fraction): a float in (0, 1] for
            every mutable unit, or a dict ``{unit name: kept ratio (float in (0, 1]) or kept channel count (int)}``;
            units not named keep their width.
        step_freq: iterations (``by_epoch=False``) or epochs (``by_epoch=True``) between pruning steps.
        prune_times: number of pruning steps.
        linear_schedule: step ``t`` (1-based) sets ``supernet + (target - supernet) * t / prune_times`` (supernet =
            the choices when the algorithm is built, normally the full width); otherwise every step sets the target
            (importance units re-rank their channels at each step).
        by_epoch: count epochs (:meth:`epoch_end`) instead of iterations (:meth:`step`).

    The counter is the index of the iteration (epoch) that just ended. A step is taken when
    ``counter % step_freq == 0 and counter // step_freq < prune_times``, with ``t = counter // step_freq + 1``: the
    same condition and choices as mmrazor, whose check runs *before* iteration ``counter`` instead of after it.
    Checking after means iteration 0 trains the full network and gradient-importance units (Taylor) have one
    batch of evidence at the first step. After each step the importance accumulators are reset, so every step
    ranks by what was learnt since the last one. :attr:`done` is true after the last step.
    """

    def __init__(self, model: nn.Module, mutator, target_pruning_ratio: Target, step_freq: int = 1,
                 prune_times: int = 1, linear_schedule: bool = True, by_epoch: bool = False):
        for name, value in (("step_freq", step_freq), ("prune_times", prune_times)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ItePruneAlgorithm: {name} must be an int >= 1, got {value!r}")
        super().__init__(model, mutator)
        self.step_freq, self.prune_times = int(step_freq), int(prune_times)
        self.linear_schedule, self.by_epoch = bool(linear_schedule), bool(by_epoch)
        self.supernet: Dict[str, Any] = dict(self.mutator.current_choices)
        self.target: Dict[str, Any] = self._validated_targets(target_pruning_ratio)
        for step in range(1, self.prune_times + 1):  # every scheduled choice is valid, checked up front
            for name, choice in self.choices_at(step).items():
                self._units[name].choice_to_count(choice)
        self.counter = 0
        self.steps_done = 0

    # ------------------------------------------------------------------------------------------------- targets
    @property
    def _units(self):
        return {u.name: u for u in self.mutator.units}

    def _validated_targets(self, target: Target) -> Dict[str, Any]:
        """``{unit name: choice in the unit's own mode}``; bad values -> ChannelSelectionError / ConfigError."""
        mutable = {u.name: u for u in self.mutator.mutable_units}
        if isinstance(target, Mapping):
            units = self._units
            unknown = sorted(str(name) for name in target if name not in units)
            if unknown:
                raise ConfigError(f"target_pruning_ratio: unknown unit names {unknown}; the mutable units are "
                                  f"{sorted(mutable)}")
            fixed = sorted(name for name in target if name not in mutable)
            if fixed:
                raise ConfigError(f"target_pruning_ratio: units {fixed} are not prunable ("
                                  f"{'; '.join(units[n].reason or 'fixed' for n in fixed)})")
            return {name: _target_choice(mutable[name], value) for name, value in target.items()}
        _check_ratio(target, "target_pruning_ratio")
        return {name: unit.choice_from_ratio(float(target)) for name, unit in mutable.items()}

    def choices_at(self, step: int) -> Dict[str, Any]:
        """The choices set at pruning step ``step`` (1-based; step ``prune_times`` gives the target)."""
        if not 1 <= step <= self.prune_times:
            raise ValueError(f"step must be in [1, {self.prune_times}], got {step}")
        if not self.linear_schedule:
            return dict(self.target)
        fraction = step / self.prune_times
        choices = {}
        for name, target in self.target.items():
            start = self.supernet[name]
            value = start + (target - start) * fraction
            choices[name] = int(math.floor(value + 0.5)) if self._units[name].choice_mode == "number" else value
        return choices

    # --------------------------------------------------------------------------------------------------- hooks
    def is_prune_time(self, counter: int) -> bool:
        return counter % self.step_freq == 0 and counter // self.step_freq < self.prune_times

    @property
    def done(self) -> bool:
        """True once the last pruning step has been taken."""
        return self.steps_done >= self.prune_times

    @property
    def next_step_counter(self) -> Union[int, None]:
        """The counter value at which the next step is taken (``None`` when done)."""
        return None if self.done else self.steps_done * self.step_freq

    def step(self) -> bool:
        return False if self.by_epoch else self._tick()

    def epoch_end(self) -> bool:
        return self._tick() if self.by_epoch else False

    def _tick(self) -> bool:
        pruned = self.is_prune_time(self.counter)
        if pruned:
            self.prune_step(self.counter // self.step_freq + 1)
        self.counter += 1
        return pruned

    def prune_step(self, step: int) -> None:
        """Set the choices of step ``step``, agree on the kept channels across ranks, restart importance."""
        self.mutator.set_choices(self.choices_at(step))
        broadcast_selections(self.mutator.mutable_units)
        self.mutator.reset_importance()
        self.steps_done = step

    # ----------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(counter=self.counter, steps_done=self.steps_done, step_freq=self.step_freq,
                     prune_times=self.prune_times, by_epoch=self.by_epoch, linear_schedule=self.linear_schedule,
                     supernet=dict(self.supernet), target=dict(self.target))
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a checkpoint of an algorithm built with the same schedule and target (else ConfigError, nothing
        changed). The supernet choices come from the checkpoint, so the algorithm may be built on a model that is
        already pruned."""
        for key in ("step_freq", "prune_times", "by_epoch", "linear_schedule", "target"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(f"ItePruneAlgorithm.load_state_dict: the checkpoint has {key}={state[key]!r}, "
                                  f"this algorithm {getattr(self, key)!r}")
        super().load_state_dict(state)
        self.counter, self.steps_done = int(state["counter"]), int(state["steps_done"])
        self.supernet = dict(state.get("supernet", self.supernet))


def _check_ratio(value, what: str) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise ChannelSelectionError(f"{what} must be a kept ratio in (0, 1], got {value!r}")


def _target_choice(unit, value):
    """A user's target for ``unit`` (kept ratio float or kept count int) as a choice in the unit's mode."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if not 1 <= value <= unit.num_channels:
            raise ChannelSelectionError(f"target_pruning_ratio[{unit.name!r}]: a kept channel count must be in "
                                        f"[1, {unit.num_channels}], got {value!r}")
        choice = int(value) if unit.choice_mode == "number" else value / unit.num_channels
    else:
        _check_ratio(value, f"target_pruning_ratio[{unit.name!r}]")
        choice = unit.choice_from_ratio(float(value))
    unit.choice_to_count(choice)
    return choice
