"""Pruning to a budget: FLOPs / parameter / latency targets, global or uniform allocation, and subnet search.

Sits between the mutator and the algorithms: it reads the mutator's units and sets their choices; the algorithms
(``ItePruneAlgorithm(budget=...)``) and the command line use it. See docs/BUDGETS.md.
"""
from .allocation import ALLOCATIONS, allocate_global, allocate_uniform, reachable_counts
from .cost import METRICS, Cost, CostModel, subnet_cost
from .errors import BudgetError
from .importance import IMPORTANCE_MEASURES, NORMALIZATIONS, rank_unit
from .latency import LatencySettings, measure_latency
from .planner import BudgetPlanner, Plan
from .prune import BudgetResult, LatencyReport, apply_budget, full_width_export, prune_to_budget
from .search import BatchNormCalibrator, Candidate, SearchResult, search_subnet, top1_accuracy
from .targets import TARGETS, Budget

__all__ = ["ALLOCATIONS", "IMPORTANCE_MEASURES", "METRICS", "NORMALIZATIONS", "TARGETS", "Budget", "BudgetError",
           "BudgetPlanner", "BudgetResult", "Cost", "CostModel", "LatencyReport", "LatencySettings", "Plan",
           "allocate_global", "allocate_uniform", "apply_budget", "full_width_export", "measure_latency",
           "prune_to_budget", "rank_unit", "reachable_counts", "BatchNormCalibrator", "Candidate", "SearchResult",
           "search_subnet", "subnet_cost", "top1_accuracy"]
