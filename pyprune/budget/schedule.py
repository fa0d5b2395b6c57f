"""An iterative budget schedule: the budget of each pruning step, reaching the target at the last one."""
from typing import List, Optional

from torch import nn

from .latency import LatencySettings
from .planner import BudgetPlanner
from .prune import BudgetResult, apply_budget
from .targets import Budget


class BudgetSchedule:
    """Step ``t`` of ``steps`` allows the fraction ``1 - (1 - f) * t / steps`` of the full model for every target
    ``f`` of ``budget`` (``linear=True``; absolute targets are fractions of the full model first), or ``f`` at
    every step (``linear=False``). Each step plans from the current widths (a unit never grows back) with the
    importance known at that moment, so gradient-based units rank on what they learnt since the last step.

    ``planner_options`` go to :class:`BudgetPlanner` (``example_inputs``, ``allocation``, ``importance``,
    ``normalization``, ``floor``, ``rank_metric``). A FLOPs / params target that the floor cannot meet raises
    BudgetError here, before training starts.
    """

    def __init__(self, model: nn.Module, mutator, budget, steps: int, linear: bool = True,
                 latency_settings: Optional[LatencySettings] = None, **planner_options):
        self.budget = Budget.from_dict(budget)
        self.steps, self.linear = int(steps), bool(linear)
        self.latency_settings = latency_settings or LatencySettings()
        self.example_inputs = planner_options.get("example_inputs")
        self.planner = BudgetPlanner(model, mutator, **planner_options)
        self.results: List[BudgetResult] = []
        counted = {k: v for k, v in self.budget.as_dict().items() if k != "latency"}
        if counted:
            self.planner.plan(Budget(**counted), start="current")  # fails now if the floor cannot meet it

    def budget_at(self, step: int) -> Budget:
        """The budget of step ``step`` (1-based; step ``steps`` is the target)."""
        if not 1 <= step <= self.steps:
            raise ValueError(f"step must be in [1, {self.steps}], got {step}")
        return self.budget.at_step(step, self.steps, self.planner.full) if self.linear else self.budget

    def prune(self, step: int) -> BudgetResult:
        """Plan and apply step ``step``'s budget; the result is also kept in :attr:`results`."""
        result = apply_budget(self.planner, self.budget_at(step), start="current",
                              latency_settings=self.latency_settings, example_inputs=self.example_inputs)
        self.results.append(result)
        return result


__all__ = ["BudgetSchedule"]
