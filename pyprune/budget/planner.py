"""BudgetPlanner: which count each unit keeps to meet a FLOPs / params budget, and applying it to the mutator."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from .allocation import (ALLOCATIONS, AUTO_FLOOR, Allocation, allocate_global, allocate_uniform, auto_floor,
                         build_ladders, check_floor, counts_at, meets)
from .cost import METRICS, Cost, CostModel
from .errors import BudgetError
from .importance import check_importance, check_normalization, rank_unit
from .targets import Budget


@dataclass
class Plan:
    """Kept counts for the mutable units (``counts``), the exact channels for units applied by index
    (``indices``), what the subnet costs, the limits it meets and the allocation's granularity there."""
    counts: Dict[str, int]
    indices: Dict[str, torch.Tensor]
    cost: Cost
    limits: Dict[str, float]
    granularity: Dict[str, float]
    all_counts: List[int] = field(repr=False, default_factory=list)


class BudgetPlanner:
    """Plans the kept channel count of every mutable unit of ``mutator`` so that ``model`` meets a budget.

    Args:
        model, mutator: a model prepared by ``mutator.prepare_from_supernet(model)``.
        example_inputs: what one forward is counted on (a tensor, tuple of tensors or a shape); default the
            mutator's ``parse_cfg`` demo input.
        allocation: ``'global'`` (channels ranked across units by importance per cost) or ``'uniform'`` (one
            ratio everywhere); see :mod:`pyprune.budget.allocation`.
        importance, normalization: the channel scores of global allocation; see :mod:`pyprune.budget.importance`.
        floor: the fewest channels a unit keeps: ``'auto'`` (default: under global allocation a quarter of the
            unit's channels, or half of what uniform allocation keeps it at when that is less -- see
            :func:`pyprune.budget.allocation.auto_floor`; under uniform allocation None), None (one channel / one
            per group, or what the unit's rounding allows), a fraction, a count, or a dict per unit name.
        cost_power: global allocation scores a channel by ``importance / cost ** cost_power``: 1 (default) ranks
            by importance per FLOP (or parameter), 0 by importance alone, values between soften the cost.
        rank_metric: the cost a channel's importance is divided by in global allocation; default the budget's
            ``flops`` if it has one (latency budgets are planned on FLOPs), else ``params``.

    The cost model is built once (one forward); :meth:`plan` computes, :meth:`apply` changes the units.
    """

    def __init__(self, model: nn.Module, mutator, *, example_inputs=None, allocation: str = "global",
                 importance=None, normalization: str = "auto", floor=AUTO_FLOOR, rank_metric: Optional[str] = None,
                 cost_power: float = 1.0):
        if allocation not in ALLOCATIONS:
            raise BudgetError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if isinstance(cost_power, bool) or not isinstance(cost_power, (int, float)) or not 0 <= cost_power <= 4:
            raise BudgetError(f"cost_power must be a number in [0, 4], got {cost_power!r}")
        if rank_metric is not None and rank_metric not in METRICS:
            raise BudgetError(f"rank_metric must be one of {METRICS}, got {rank_metric!r}")
        check_importance(importance)
        check_normalization(normalization)
        check_floor(floor, {u.name for u in mutator.units})
        self.model, self.mutator = model, mutator
        self.allocation, self.importance, self.normalization = allocation, importance, normalization
        self.floor, self.rank_metric, self.cost_power = floor, rank_metric, float(cost_power)
        self.cost_model = CostModel.from_model(model, mutator, example_inputs)
        self.full: Cost = self.cost_model.full()

    # ------------------------------------------------------------------------------------------------ planning
    def floor_cost(self, start: str = "full") -> Cost:
        """What the model costs with every mutable unit at its floor (the least any budget can reach; for the
        ``'auto'`` floor, which depends on the budget, the smallest count of every unit)."""
        floor = None if self.floor == AUTO_FLOOR else self.floor
        ladders = build_ladders(self.cost_model, floor, self._start_counts(start))
        return self.cost_model.cost(counts_at(self.cost_model.as_counts(), ladders, "bottom"))

    def plan(self, budget, start: str = "full") -> Plan:
        """The counts that meet ``budget``'s ``flops`` / ``params`` limits (a latency target is handled by
        :func:`pyprune.budget.apply_budget`). ``start``: ``'full'`` (units may keep up to all their channels) or
        ``'current'`` (never more than they keep now: an iterative schedule only shrinks). Nothing is changed.

        Raises BudgetError, naming the floor, when even every unit at its floor costs more than the limits.
        """
        budget = Budget.from_dict(budget)
        limits = budget.limits(self.full)
        if not limits:
            raise BudgetError("plan() needs a flops or params limit; a latency budget is met by apply_budget()")
        start_counts = self._start_counts(start)
        base = self.cost_model.as_counts(start_counts)
        floor = None if self.floor == AUTO_FLOOR else self.floor
        ladders = build_ladders(self.cost_model, floor, start_counts)
        self._check_reachable(counts_at(base, ladders, "bottom"), limits, budget, floor)
        if self.allocation == "uniform":
            allocation = allocate_uniform(self.cost_model, ladders, limits, base)
            rankings = {}
        else:
            if self.floor == AUTO_FLOOR:  # depends on the budget: what uniform allocation keeps of every unit
                uniform = allocate_uniform(self.cost_model, ladders, limits, base)
                ladders = build_ladders(self.cost_model, auto_floor(ladders, uniform.counts), start_counts)
            rankings = {ladder.pos: rank_unit(self.model, ladder.unit, self.importance, self.normalization)
                        for ladder in ladders}
            metric = self.rank_metric or ("flops" if "flops" in limits or budget.latency else "params")
            allocation = allocate_global(self.cost_model, ladders, rankings, limits, base, metric,
                                         cost_power=self.cost_power)
        return self._plan_from(allocation, ladders, rankings, limits)

    def _start_counts(self, start: str) -> List[int]:
        if start == "full":
            return self.cost_model.full_counts
        if start == "current":
            return self.cost_model.as_counts()
        raise BudgetError(f"start must be 'full' or 'current', got {start!r}")

    def _check_reachable(self, floor_counts, limits, budget: Budget, floor) -> None:
        if meets(self.cost_model, floor_counts, limits):
            return
        floor_cost = self.cost_model.cost(floor_counts)
        missed = [m for m in limits if floor_cost[m] > limits[m]]
        details = "; ".join(f"{m}: target {limits[m]:,.0f} ({limits[m] / self.full[m]:.1%} of the full model's "
                            f"{self.full[m]:,.0f}) but the floor is {floor_cost[m]:,.0f} "
                            f"({floor_cost[m] / self.full[m]:.1%})" for m in missed)
        floor = "one channel / one group per unit" if floor is None else f"floor={floor!r}"
        raise BudgetError(f"budget {budget.describe(self.full)} cannot be met: with every prunable unit at its floor "
                          f"({floor}) and the fixed units at full width the model still costs more. {details}. "
                          f"Raise the target or lower the floor; nothing was changed.")

    def _plan_from(self, allocation: Allocation, ladders, rankings, limits) -> Plan:
        counts, indices = {}, {}
        for ladder in ladders:
            count = allocation.counts[ladder.pos]
            counts[ladder.unit.name] = count
            ranking = rankings.get(ladder.pos)
            if ranking is not None and ranking.by_index:
                indices[ladder.unit.name] = ranking.kept_index(count)
        return Plan(counts=counts, indices=indices, cost=self.cost_model.cost(allocation.counts), limits=limits,
                    granularity=allocation.granularity, all_counts=allocation.counts)

    # ------------------------------------------------------------------------------------------------ applying
    def apply(self, plan: Plan) -> None:
        """Set the planned counts (one validated ``set_choices``), then the exact channels of by-index units."""
        units = {u.name: u for u in self.mutator.units}
        self.mutator.set_choices({name: units[name].count_to_choice(count) for name, count in plan.counts.items()
                                  if name not in plan.indices})
        for name, index in plan.indices.items():
            units[name].apply_index(index.to(units[name].device))

    def current_cost(self) -> Cost:
        """What the model costs at its current choices (from the cost model: no forward, no export)."""
        return self.cost_model.cost()


__all__ = ["BudgetPlanner", "Plan"]
