"""Prune a model to a budget in one shot: ``prune_to_budget(model, mutator, flops=0.5)``."""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import nn

from ..mutators import full_width_export
from ..tracing.example_inputs import model_device
from .cost import METRICS, Cost, example_inputs_for
from .errors import BudgetError
from .latency import LatencySettings, measure_latency
from .planner import BudgetPlanner, Plan
from .targets import Budget

LATENCY_SEARCH_STEPS = 6


@dataclass
class LatencyReport:
    """Measured latency of the exported full model and of the exported pruned model, and how it was measured."""
    full_s: float
    pruned_s: float
    target: float
    method: str

    @property
    def ratio(self) -> float:
        return self.pruned_s / self.full_s


@dataclass
class BudgetResult:
    """What :func:`prune_to_budget` did: the kept counts, the cost before / after and the target it met.

    ``granularity[metric]``: what the next larger candidate along the allocation's order would have added; the
    result costs at most the limit and, for the metric that bound it, less than ``granularity`` below it.
    """
    budget: Budget
    allocation: str
    counts: Dict[str, int]
    cost: Cost
    full: Cost
    limits: Dict[str, float]
    granularity: Dict[str, float]
    latency: Optional[LatencyReport] = None

    def kept(self, metric: str) -> float:
        return self.cost[metric] / self.full[metric] if self.full[metric] else 1.0

    def __str__(self) -> str:
        lines = [f"budget {self.budget.describe(self.full)}, {self.allocation} allocation",
                 f"{'':9}{'full':>16}{'pruned':>16}{'kept':>8}{'target':>9}{'granularity':>14}"]
        for metric in METRICS:
            limit = self.limits.get(metric)
            target = f"{limit / self.full[metric]:.1%}" if limit is not None else "-"
            lines.append(f"{metric:9}{self.full[metric]:>16,.0f}{self.cost[metric]:>16,.0f}"
                         f"{self.kept(metric):>8.1%}{target:>9}{self.granularity.get(metric, 0):>14,.0f}")
        if self.latency is not None:
            lat = self.latency
            lines.append(f"{'latency':9}{lat.full_s * 1e3:>13.3f} ms{lat.pruned_s * 1e3:>13.3f} ms{lat.ratio:>8.1%}"
                         f"{lat.target:>9.1%}   (measured: {lat.method})")
        return "\n".join(lines)


def prune_to_budget(model: nn.Module, mutator, *, flops=None, params=None, latency=None, example_inputs=None,
                    allocation: str = "global", importance=None, normalization: str = "auto", floor="auto",
                    cost_power: float = 1.0,
                    latency_settings: LatencySettings = LatencySettings()) -> BudgetResult:
    """Set the kept channels of every mutable unit so that ``model`` meets the budget, in one shot.

    Args:
        model, mutator: a model prepared by ``mutator.prepare_from_supernet(model)``.
        flops, params: upper limits, a fraction of the full model in (0, 1] (or ``'50%'``) or an absolute count;
            FLOPs of one forward of ``example_inputs`` (default: the mutator's demo input).
        latency: a fraction in (0, 1] of the full model's *measured* latency on the model's device: the exported
            subnet is timed (see :class:`LatencySettings`) for up to 8 FLOPs budgets found by bisection and the
            largest that meets the target is kept.
        allocation, importance, normalization, floor, cost_power: see :class:`BudgetPlanner`.

    Returns a :class:`BudgetResult` (``print()`` it for a table). The units are changed; export with
    ``mutator.export(model)``. A target that cannot be met raises BudgetError naming the floor, with nothing
    changed.
    """
    budget = Budget(flops=flops, params=params, latency=latency)
    planner = BudgetPlanner(model, mutator, example_inputs=example_inputs, allocation=allocation,
                            importance=importance, normalization=normalization, floor=floor,
                            cost_power=cost_power)
    return apply_budget(planner, budget, start="full", latency_settings=latency_settings,
                        example_inputs=example_inputs)


def apply_budget(planner: BudgetPlanner, budget, start: str = "full",
                 latency_settings: LatencySettings = LatencySettings(), example_inputs=None) -> BudgetResult:
    """Plan ``budget`` with ``planner`` and apply it (``start``: see :meth:`BudgetPlanner.plan`)."""
    budget = Budget.from_dict(budget)
    if budget.latency is None:
        plan = planner.plan(budget, start)
        planner.apply(plan)
        return _result(planner, budget, plan)
    inputs = example_inputs_for(planner.model, planner.mutator, example_inputs)
    plan, report = _meet_latency(planner, budget, start, inputs, latency_settings)
    return _result(planner, budget, plan, report)


def _result(planner: BudgetPlanner, budget: Budget, plan: Plan, latency=None) -> BudgetResult:
    return BudgetResult(budget=budget, allocation=planner.allocation, counts=dict(plan.counts), cost=plan.cost,
                        full=planner.full, limits=dict(plan.limits), granularity=dict(plan.granularity),
                        latency=latency)


def _meet_latency(planner: BudgetPlanner, budget: Budget, start: str, inputs,
                  settings: LatencySettings) -> Tuple[Plan, LatencyReport]:
    """The largest FLOPs budget (within the other limits) whose exported subnet meets the latency fraction.

    Latency falls with FLOPs but not in proportion (memory-bound layers, launch overheads), so it is measured:
    bisection on the FLOPs fraction between the floor and the FLOPs limit, each candidate applied, exported and
    timed. On failure the units are restored and BudgetError says what the floor measured.
    """
    device_model = planner.model
    method = settings.describe(model_device(device_model), inputs)
    full_s = measure_latency(full_width_export(device_model), inputs, settings)
    counted = {k: v for k, v in budget.as_dict().items() if k != "latency"}
    saved = planner.mutator.selection_state()  # the one saved form of the selection
    floor_fraction = planner.floor_cost(start).flops / planner.full.flops
    high = Budget(**counted).fraction("flops", planner.full) if counted.get("flops") else 1.0

    def attempt(fraction: float):
        plan = planner.plan(Budget(**{**counted, "flops": min(1.0, fraction)}), start)
        planner.apply(plan)
        return plan, measure_latency(planner.mutator.export(device_model), inputs, settings) / full_s

    try:
        best = attempt(high)
        if best[1] > budget.latency:
            low = floor_fraction * (1 + 1e-9)
            best = attempt(low)
            if best[1] > budget.latency:
                raise BudgetError(f"latency target {budget.latency:.1%} cannot be met: with every prunable unit at "
                                  f"its floor the exported model measures {best[1]:.1%} of the full model "
                                  f"({method}); raise the target or lower the floor; nothing was changed.")
            for _ in range(LATENCY_SEARCH_STEPS):
                middle = (low + high) / 2
                candidate = attempt(middle)
                if candidate[1] <= budget.latency:
                    low, best = middle, candidate
                else:
                    high = middle
    except Exception:
        planner.mutator.load_selection_state(saved, where="prune_to_budget")
        raise
    plan, ratio = best
    planner.apply(plan)
    return plan, LatencyReport(full_s=full_s, pruned_s=ratio * full_s, target=budget.latency, method=method)


__all__ = ["prune_to_budget", "apply_budget", "BudgetResult", "LatencyReport", "full_width_export"]
