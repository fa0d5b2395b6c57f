"""ItePruneAlgorithm: prune step by step during training, towards a target width (mmrazor's schedule)."""
import math
import numbers
from collections.abc import Mapping
from typing import Any, Dict, Optional, Union

from ..budget.schedule import BudgetSchedule
from ..budget.targets import Budget
from ..errors import ChannelSelectionError, ConfigError
from ..registry import MODELS
from ..units.leniency import LenientReport
from .base import BaseAlgorithm
from .unit_state import broadcast_selections

Target = Union[None, float, Mapping]


class ItePruneConfigManager:
    """The pruning schedule as mmrazor's class of that name computes it: which counter values prune, and to what.

    Args:
        target: ``{unit name: choice}`` at the end of the schedule.
        supernet: ``{unit name: choice}`` at the start (normally the full width).
        step_freq: counter values between two pruning steps.
        prune_times: number of pruning steps.
        linear_schedule: step ``t`` (1-based) sets ``(target - supernet) * t / prune_times + supernet``, truncated
            to an int where the supernet choice is an int (a number-mode unit: 10 -> 5 in 3 steps gives 8, 6, 5);
            otherwise every step sets the target.
    """

    def __init__(self, target: Dict[str, Any], supernet: Dict[str, Any], step_freq: int = 1, prune_times: int = 1,
                 linear_schedule: bool = True):
        self.target, self.supernet = dict(target), dict(supernet)
        self.step_freq, self.prune_times, self.linear_schedule = step_freq, prune_times, linear_schedule

    def is_prune_time(self, iteration: int) -> bool:
        """Whether counter value ``iteration`` is a pruning step."""
        return iteration % self.step_freq == 0 and iteration // self.step_freq < self.prune_times

    def prune_at(self, iteration: int) -> Dict[str, Any]:
        """The choices of the pruning step taken at counter value ``iteration``."""
        return self.choices_at_step(iteration // self.step_freq + 1)

    def choices_at_step(self, step: int) -> Dict[str, Any]:
        """The choices of pruning step ``step`` (1-based; step ``prune_times`` gives the target)."""
        if not 1 <= step <= self.prune_times:
            raise ValueError(f"step must be in [1, {self.prune_times}], got {step}")
        fraction = step / self.prune_times
        choices = {}
        for name, target in self.target.items():
            start = self.supernet[name]
            value = (target - start) * fraction + start if self.linear_schedule else target
            if isinstance(start, numbers.Integral):
                value = math.floor(value + 1e-9)  # mmrazor's int(); float noise must not cost a channel
            choices[name] = value
        return choices


@MODELS.register_module()
class ItePruneAlgorithm(BaseAlgorithm):
    """Iterative pruning: ``prune_times`` steps, ``step_freq`` iterations (or epochs) apart.

    mmrazor's signature: ``ItePruneAlgorithm(architecture, mutator_cfg=..., target_pruning_ratio=..., step_freq=...,
    prune_times=..., linear_schedule=...)``; ``ItePruneAlgorithm(model, mutator, 0.5)`` works too.

    Args:
        architecture, mutator_cfg: the model and its mutator, objects or config dicts (see :class:`BaseAlgorithm`).
        target_pruning_ratio: the width to reach, as mmrazor means it (the *kept* fraction): a dict ``{unit name:
            choice}`` (a float is a kept ratio, an int a kept channel count; units not named keep their width), as
            :attr:`ChannelMutator.choice_template` writes it; ``None`` (mmrazor's default) keeps the current
            structure; or one float for every mutable unit (pyprune's shorthand: ``ratio`` of each unit's channels,
            the count :func:`pyprune.channels.ratio_to_count` names, as a float choice of that ratio keeps). Names
            of units the model lacks or that cannot be pruned, and counts above a unit's width, are skipped /
            clamped with one warning, as mmrazor skips them silently (``strict=True`` raises instead).
        step_freq: iterations (``by_epoch=False``) or epochs (``by_epoch=True``) between pruning steps.
        prune_times: number of pruning steps.
        linear_schedule: see :class:`ItePruneConfigManager` (the schedule's arithmetic is mmrazor's).
        by_epoch: ``step_freq`` counts epochs. The counter advances in :meth:`epoch_end`; or, when
            ``iters_per_epoch`` is given, in :meth:`step` every iteration with steps ``step_freq * iters_per_epoch``
            iterations apart, as mmrazor's epoch-based runner does.
        iters_per_epoch: see ``by_epoch``.
        strict: raise on target entries that mmrazor would skip or clamp.
        data_preprocessor, init_cfg: mmrazor's; see :class:`BaseAlgorithm`.
        budget: instead of ``target_pruning_ratio``, what the pruned model may cost: ``{'flops': 0.5}``,
            ``{'params': 10e6}``, ``{'latency': 0.6}`` (fractions of the full model or absolute counts; see
            :class:`pyprune.budget.Budget`). Step ``t`` allows ``1 - (1 - f) * t / prune_times`` of the full model
            (``linear_schedule``; otherwise ``f`` at every step), allocated across units by
            :class:`pyprune.budget.BudgetPlanner` from the current widths; :attr:`budget_schedule` keeps each step's
            result. A FLOPs / params target below the floor raises BudgetError here.
        budget_cfg: options of the planner: ``allocation`` (``'global'`` | ``'uniform'``), ``importance``,
            ``normalization``, ``floor``, ``example_inputs`` (default: the mutator's demo input), ``rank_metric``.
        optimizer: the optimizer(s) of your training loop. Given, the pruned subnet trains in compact mode between
            steps and after the last one (``compact=True``, the default; see :meth:`start_compact_training`): a
            step costs what the exported model's step costs, and the optimizer's state follows every step.
            Without it (or with ``compact=False``) the model stays in gather mode.

    The counter is the index of the iteration (epoch) that just ended. A step is taken when
    ``counter % step_freq == 0 and counter // step_freq < prune_times``, with ``t = counter // step_freq + 1``: the
    same condition and choices as mmrazor, whose check runs *before* iteration ``counter`` instead of after it.
    Checking after means iteration 0 trains the full network and gradient-importance units (Taylor) have one
    batch of evidence at the first step. After each step the importance accumulators are reset, so every step
    ranks by what was learnt since the last one. :attr:`done` is true after the last step.
    """

    def __init__(self, architecture, mutator_cfg=None, target_pruning_ratio: Target = None, step_freq: int = 1,
                 prune_times: int = 1, linear_schedule: bool = True, by_epoch: bool = False, *,
                 iters_per_epoch: Optional[int] = None, strict: bool = False, data_preprocessor=None,
                 init_cfg: Optional[Dict] = None, budget: Optional[Mapping] = None,
                 budget_cfg: Optional[Mapping] = None, optimizer=None, compact: bool = True):
        for name, value in (("step_freq", step_freq), ("prune_times", prune_times),
                            ("iters_per_epoch", 1 if iters_per_epoch is None else iters_per_epoch)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ItePruneAlgorithm: {name} must be an int >= 1, got {value!r}")
        if iters_per_epoch is not None and not by_epoch:
            raise ConfigError("ItePruneAlgorithm: iters_per_epoch is only used with by_epoch=True")
        if budget is not None and target_pruning_ratio is not None:
            raise ConfigError("ItePruneAlgorithm: give target_pruning_ratio (kept widths) or budget (e.g. "
                              "{'flops': 0.5}), not both")
        self.budget = None if budget is None else Budget.from_dict(budget).as_dict()
        super().__init__(architecture, mutator_cfg, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.step_freq, self.prune_times = int(step_freq), int(prune_times)
        self.linear_schedule, self.by_epoch, self.strict = bool(linear_schedule), bool(by_epoch), bool(strict)
        self.iters_per_epoch = None if iters_per_epoch is None else int(iters_per_epoch)
        self.supernet: Dict[str, Any] = dict(self.mutator.current_choices)
        self.target: Dict[str, Any] = self._validated_targets(target_pruning_ratio)
        self.budget_schedule: Optional[BudgetSchedule] = None
        if budget is not None:  # each step's choices are planned when it comes (self.target keeps the widths)
            try:
                self.budget_schedule = BudgetSchedule(self.model, self.mutator, budget, self.prune_times,
                                                      self.linear_schedule, **dict(budget_cfg or {}))
            except TypeError as error:
                raise ConfigError(f"ItePruneAlgorithm: bad budget_cfg: {error}") from None
        for step in range(1, self.prune_times + 1):  # every scheduled choice is valid, checked up front
            for name, choice in self.choices_at(step).items():
                self._units[name].choice_to_count(choice)
        self.counter = 0
        self.steps_done = 0
        if optimizer is not None and compact:  # last: a bad argument above leaves the model as it was
            self.start_compact_training(optimizer)

    # ------------------------------------------------------------------------------------------------- targets
    @property
    def _units(self):
        return {u.name: u for u in self.mutator.units}

    def _validated_targets(self, target: Target) -> Dict[str, Any]:
        """``{unit name: choice in the unit's own mode}``; bad values -> ChannelSelectionError / ConfigError."""
        mutable = {u.name: u for u in self.mutator.mutable_units}
        if target is None:
            return dict(self.mutator.current_choices)
        if not isinstance(target, Mapping):
            _check_ratio(target, "target_pruning_ratio")
            return {name: unit.choice_from_ratio(float(target)) for name, unit in mutable.items()}
        units = self._units
        unknown = sorted(str(name) for name in target if name not in units)
        fixed = sorted(name for name in target if name in units and name not in mutable)
        if self.strict and unknown:
            raise ConfigError(f"target_pruning_ratio: unknown unit names {unknown}; the mutable units are "
                              f"{sorted(mutable)}")
        if self.strict and fixed:
            raise ConfigError(f"target_pruning_ratio: units {fixed} are not prunable ("
                              f"{'; '.join(units[n].reason or 'fixed' for n in fixed)})")
        report = LenientReport("target_pruning_ratio")
        report.ignore(unknown, "units the model does not have")
        report.ignore(fixed, "units that are not prunable")
        choices = {name: _target_choice(mutable[name], value, report, self.strict)
                   for name, value in target.items() if name in mutable}
        report.finish(stacklevel=4)
        return choices

    @property
    def _schedule(self) -> ItePruneConfigManager:
        return ItePruneConfigManager(self.target, self.supernet, self._counter_step_freq, self.prune_times,
                                     self.linear_schedule)

    def choices_at(self, step: int) -> Dict[str, Any]:
        """The choices set at pruning step ``step`` (1-based; step ``prune_times`` gives the target)."""
        return self._schedule.choices_at_step(step)

    # --------------------------------------------------------------------------------------------------- hooks
    @property
    def _counter_step_freq(self) -> int:
        """Counter values between steps: ``step_freq``, in iterations when epochs are counted by iteration."""
        return self.step_freq * (self.iters_per_epoch or 1)

    @property
    def _counts_iterations(self) -> bool:
        return not self.by_epoch or self.iters_per_epoch is not None

    def is_prune_time(self, counter: int) -> bool:
        return self._schedule.is_prune_time(counter)

    @property
    def done(self) -> bool:
        """True once the last pruning step has been taken."""
        return self.steps_done >= self.prune_times

    @property
    def next_step_counter(self) -> Union[int, None]:
        """The counter value at which the next step is taken (``None`` when done)."""
        return None if self.done else self.steps_done * self._counter_step_freq

    def step(self) -> bool:
        return self._tick() if self._counts_iterations else False

    def epoch_end(self) -> bool:
        return False if self._counts_iterations else self._tick()

    def _tick(self) -> bool:
        pruned = self.is_prune_time(self.counter)
        if pruned:
            self.prune_step(self.counter // self._counter_step_freq + 1)
        self.counter += 1
        return pruned

    def prune_step(self, step: int) -> None:
        """Set the choices of step ``step``, agree on the kept channels across ranks, restart importance."""
        # In compact training mode: full-size tensors for ranking, the cost model and latency exports, and one
        # write-back / compaction for the whole step (the ranks' agreement included).
        with self.full_size():
            if self.budget_schedule is not None:
                self.budget_schedule.prune(step)
            else:
                self.mutator.set_choices(self.choices_at(step))
            broadcast_selections(self.mutator.mutable_units)
        self.mutator.reset_importance()
        self.steps_done = step

    # ----------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(counter=self.counter, steps_done=self.steps_done, step_freq=self.step_freq,
                     prune_times=self.prune_times, by_epoch=self.by_epoch, linear_schedule=self.linear_schedule,
                     iters_per_epoch=self.iters_per_epoch, supernet=dict(self.supernet), target=dict(self.target),
                     budget=self.budget)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a checkpoint of an algorithm built with the same schedule and target (else ConfigError, nothing
        changed). The supernet choices come from the checkpoint, so the algorithm may be built on a model that is
        already pruned."""
        for key in ("step_freq", "prune_times", "by_epoch", "linear_schedule", "iters_per_epoch", "target",
                    "budget"):
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


def _target_choice(unit, value, report: LenientReport, strict: bool):
    """A target for ``unit`` (kept ratio float or kept count int) as a choice in the unit's mode: a float stays a
    ratio in ratio mode and becomes the count it names in number mode (mmrazor's truncation); a count above the
    unit's width is clamped to it (reported), or refused when ``strict``."""
    where = f"target_pruning_ratio[{unit.name!r}]"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value > unit.num_channels and not strict:
            report.clamp(f"{unit.name} ({value} > {unit.num_channels})")
            value = unit.num_channels
        if not 1 <= value <= unit.num_channels:
            raise ChannelSelectionError(f"{where}: a kept channel count must be in [1, {unit.num_channels}], got "
                                        f"{value!r}")
        choice = int(value) if unit.choice_mode == "number" else value / unit.num_channels
    else:
        _check_ratio(value, where)
        choice = float(value) if unit.choice_mode == "ratio" else unit.width_to_count(float(value))
    unit.choice_to_count(choice)
    return choice
