"""Evolutionary subnet search under a FLOPs / params budget, for one-shot and slimmable supernets.

Every candidate is a kept count per mutable unit. It is checked against the budget on the cost model (arithmetic,
no forward), switched to with ``mutator.set_choices`` (the dynamic layers change their index, nothing is re-traced
or exported), its BatchNorm statistics recalibrated where the unit kind needs it, and scored on a held-out loader.
The best candidates breed the next generation (per-unit crossover and mutation); the best one is applied at the end.
"""
import json
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops import SwitchableBatchNorm2d
from ..units import OneShotMutableChannelUnit
from .allocation import AUTO_FLOOR, build_ladders, check_floor, meets
from .cost import METRICS, Cost, CostModel
from .errors import BudgetError
from .targets import Budget


@dataclass
class Candidate:
    """A subnet: kept count per mutable unit, its cost and (once evaluated) its score (higher is better)."""
    counts: Dict[str, int]
    cost: Cost
    score: float = math.nan

    def key(self):
        return tuple(sorted(self.counts.items()))


@dataclass
class SearchResult:
    """The evaluated candidates (best first), the full model's cost and the chosen structure as a ChannelMutator
    config (``ChannelMutator.from_config(result.config)`` rebuilds it on a fresh model)."""
    candidates: List[Candidate]
    full: Cost
    limits: Dict[str, float]
    config: Dict = field(repr=False, default_factory=dict)

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def table(self, top: int = 10) -> str:
        lines = [f"{'rank':>4}{'score':>9}{'flops':>16}{'kept':>8}{'params':>14}{'kept':>8}{'mean width':>12}"]
        for rank, candidate in enumerate(self.candidates[:top], 1):
            cost = candidate.cost
            widths = [count for count in candidate.counts.values()]
            width = sum(widths) / max(1, len(widths))
            lines.append(f"{rank:>4}{candidate.score:>9.4f}{cost.flops:>16,.0f}{cost.flops / self.full.flops:>8.1%}"
                         f"{cost.params:>14,.0f}{cost.params / self.full.params:>8.1%}{width:>12.1f}")
        return "\n".join(lines)

    def save_json(self, path: str) -> None:
        """Write :attr:`config` (the best subnet's structure, mmrazor layout with channels) to ``path``."""
        with open(path, "w") as handle:
            json.dump(self.config, handle, indent=1)


def top1_accuracy(model: nn.Module, loader, max_batches: Optional[int] = None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode, no grad) over ``loader``'s (images, labels) batches."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch, (images, labels) in enumerate(loader):
            if max_batches is not None and batch >= max_batches:
                break
            labels = labels.to(device)
            correct += int((model(images.to(device)).argmax(1) == labels).sum())
            total += labels.numel()
    return correct / total if total else math.nan


class BatchNormCalibrator:
    """Recalibrates BatchNorm running statistics for the active subnet: a cumulative average over ``batches``
    training-mode forwards (no grad). Momentum ``1 / (i + 1)`` at batch ``i`` overwrites the active channels at
    the first batch, so no reset is needed, and inactive channels keep their statistics. :meth:`restore` puts back
    every statistic as it was when the calibrator was made."""

    def __init__(self, model: nn.Module, loader, batches: int):
        self.model, self.loader, self.batches = model, loader, batches
        # a switchable BN (and its per-width BNs) holds statistics of its own for each width: left alone (and run
        # in eval mode while calibrating, so that its own momentum does not move them either)
        self.switched = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
        switched = {id(n) for m in self.switched for n in m.modules()}
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      and m.track_running_stats and id(m) not in switched]
        self.saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
                      for m in self.norms]

    def calibrate(self) -> None:
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        was_training = self.model.training
        self.model.train()
        for norm in self.switched:
            norm.eval()
        try:
            with torch.no_grad():
                for batch, (images, _) in enumerate(self.loader):
                    if batch >= self.batches:
                        break
                    for norm in self.norms:
                        norm.momentum = 1.0 / (batch + 1)
                    self.model(images.to(device))
        finally:
            for norm, (_, _, _, momentum) in zip(self.norms, self.saved):
                norm.momentum = momentum
            self.model.train(was_training)

    def restore(self) -> None:
        with torch.no_grad():
            for norm, (mean, var, tracked, momentum) in zip(self.norms, self.saved):
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
                norm.num_batches_tracked.copy_(tracked)
                norm.momentum = momentum


def needs_bn_recalibration(mutator) -> bool:
    """One-shot units share one set of BatchNorm statistics across all widths (they were trained switching widths),
    so a subnet's statistics must be recalibrated before it is scored. Slimmable units whose BNs switch per width
    (:class:`~pyprune.ops.SwitchableBatchNorm2d`) have their own statistics for each width and need none."""
    return any(isinstance(unit, OneShotMutableChannelUnit) and _shares_bn_statistics(unit)
               for unit in mutator.mutable_units)


def _shares_bn_statistics(unit) -> bool:
    norms = [m for _, m in unit.output_layers() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return not all(isinstance(m, SwitchableBatchNorm2d) for m in norms) if norms else False


class _SearchSpace:
    """Per mutable unit, the counts a candidate may give it (ascending): the unit's candidate choices for
    one-shot / slimmable units, else ``levels`` counts evenly spread over its ladder."""

    def __init__(self, cost_model: CostModel, floor, levels: int):
        self.cost_model = cost_model
        ladders = build_ladders(cost_model, floor, cost_model.full_counts)
        self.units = [ladder.unit for ladder in ladders]
        self.options: List[List[int]] = []
        for ladder in ladders:
            unit = ladder.unit
            if isinstance(unit, OneShotMutableChannelUnit):
                wanted = [unit.width_to_count(c) for c in unit.candidate_choices]
                options = sorted({c for c in wanted if c >= ladder.counts[0]}) or [ladder.counts[0]]
            else:
                spread = (unit.num_channels * k / levels for k in range(1, levels + 1))
                options = sorted({_nearest(ladder.counts, width) for width in spread})
            self.options.append(options)

    def candidate(self, positions: Sequence[int]) -> Candidate:
        counts = {unit.name: options[p] for unit, options, p in zip(self.units, self.options, positions)}
        return Candidate(counts, self.cost_model.cost(counts))

    def uniform_positions(self, t: float) -> List[int]:
        return [round(t * (len(options) - 1)) for options in self.options]


def _nearest(counts: Sequence[int], value: float) -> int:
    return min(counts, key=lambda c: (abs(c - value), c))


def search_subnet(model: nn.Module, mutator, loader, *, flops=None, params=None, example_inputs=None,
                  score_fn: Optional[Callable[[nn.Module], float]] = None, eval_batches: Optional[int] = None,
                  population: int = 16, generations: int = 4, mutation_prob: float = 0.2, levels: int = 8,
                  floor=None, recalibrate_bn="auto", calib_loader=None, calib_batches: int = 8, seed: int = 0,
                  progress: bool = True) -> SearchResult:
    """Search the subnet with the best score that meets a ``flops`` / ``params`` budget; leave the model at it.

    Args:
        loader: held-out (images, labels) batches that score candidates (top-1 accuracy over ``eval_batches``
            batches, all by default) unless ``score_fn(model) -> float`` (higher is better) is given.
        flops, params: the budget (a fraction of the full model or an absolute count; see :class:`Budget`).
        population, generations: candidates per generation and how many generations (so at most
            ``population * generations`` evaluations); the best half of everything seen so far breeds the next
            generation, half by per-unit crossover and half by mutation (each unit moves one or two options with
            probability ``mutation_prob``).
        levels: how many counts a unit without candidate choices may take (its ladder at 1/levels ... 1).
        floor: the fewest channels per unit, as in :class:`~pyprune.budget.BudgetPlanner`.
        recalibrate_bn: recalibrate BatchNorm statistics for every candidate on ``calib_loader`` (default:
            ``loader``; a training loader is the better choice) over ``calib_batches`` batches. ``'auto'``: when
            the mutator has one-shot / slimmable units (a shared-weight supernet).
        seed: candidates are drawn from ``random.Random(seed)``.

    The model is left at the best subnet (BatchNorm statistics recalibrated for it when recalibration is on, all
    others restored). Returns a :class:`SearchResult` (``result.table()``, ``result.save_json(path)``).
    """
    if flops is None and params is None:
        raise BudgetError("search_subnet needs a flops or params budget (latency is not searched)")
    for name, value in (("population", population), ("generations", generations), ("levels", levels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BudgetError(f"search_subnet: {name} must be an int >= 1, got {value!r}")
    budget = Budget(flops=flops, params=params)
    if floor == AUTO_FLOOR:  # it is defined relative to a uniform plan, which a search has none of
        raise BudgetError("search_subnet: floor='auto' is global allocation's default; give None, a fraction, a "
                          "channel count or a dict of those")
    check_floor(floor, {u.name for u in mutator.units})
    cost_model = CostModel.from_model(model, mutator, example_inputs)
    full = cost_model.full()
    limits = budget.limits(full)
    space = _SearchSpace(cost_model, floor, levels)
    smallest = space.candidate([0] * len(space.units))
    if not meets(cost_model, cost_model.as_counts(smallest.counts), limits):
        costs = ", ".join(f"{m} {smallest.cost[m]:,.0f} ({smallest.cost[m] / full[m]:.1%})" for m in METRICS)
        raise BudgetError(f"budget {budget.describe(full)} cannot be met by any candidate: the smallest one (every "
                          f"unit at its floor) costs {costs}; nothing was changed")
    recalibrate = needs_bn_recalibration(mutator) if recalibrate_bn == "auto" else bool(recalibrate_bn)
    calibrator = BatchNormCalibrator(model, calib_loader or loader, calib_batches) if recalibrate else None
    score = score_fn or (lambda m: top1_accuracy(m, loader, eval_batches))
    rng = random.Random(seed)
    evolution = _Evolution(space, limits, rng, mutation_prob)
    seen: Dict[tuple, Candidate] = {}
    start_choices = dict(mutator.current_choices)
    try:
        with tqdm(total=population * generations, desc="subnet search", disable=not progress) as bar:
            for generation in range(generations):
                parents = sorted(seen.values(), key=lambda c: -c.score)[:max(2, population // 2)]
                for candidate in evolution.generation(parents, population, generation == 0, seen):
                    _switch(mutator, candidate.counts)
                    if calibrator is not None:
                        calibrator.calibrate()
                    candidate.score = float(score(model))
                    seen[candidate.key()] = candidate
                    bar.update(1)
                    bar.set_postfix(best=f"{max(c.score for c in seen.values()):.4f}")
    except BaseException:
        if calibrator is not None:
            calibrator.restore()
        mutator.set_choices(start_choices)
        raise
    ranked = sorted(seen.values(), key=lambda c: -c.score)
    if calibrator is not None:
        calibrator.restore()
    _switch(mutator, ranked[0].counts)
    if calibrator is not None:
        calibrator.calibrate()
    config = mutator.config_template(with_unit_init_args=True, with_channels=True)
    return SearchResult(candidates=ranked, full=full, limits=limits, config=config)


def _switch(mutator, counts: Dict[str, int]) -> None:
    units = {u.name: u for u in mutator.mutable_units}
    mutator.set_choices({name: units[name].count_to_choice(count) for name, count in counts.items()})


class _Evolution:
    """Draws candidates that meet the limits: random ones filled up to the limits at first, then by crossover
    and mutation of the best."""

    def __init__(self, space: _SearchSpace, limits, rng: random.Random, mutation_prob: float, tries: int = 200):
        self.space, self.limits, self.rng = space, limits, rng
        self.mutation_prob, self.tries = mutation_prob, tries
        self.widest = self._widest_uniform()

    def _meets(self, positions) -> bool:
        candidate = self.space.candidate(positions)
        return all(candidate.cost[m] <= self.limits[m] for m in self.limits)

    def _widest_uniform(self) -> float:
        low, high = 0.0, 1.0
        if self._meets(self.space.uniform_positions(high)):
            return high
        for _ in range(20):
            middle = (low + high) / 2
            low, high = (middle, high) if self._meets(self.space.uniform_positions(middle)) else (low, middle)
        return low

    def generation(self, parents: List[Candidate], size: int, first: bool, seen) -> List[Candidate]:
        made: Dict[tuple, Candidate] = {}
        if first:
            self._add(self.space.uniform_positions(self.widest), made, seen)
        for _ in range(self.tries * size):
            if len(made) >= size:
                break
            if first or len(parents) < 2:
                positions = self._random_fill()
            elif self.rng.random() < 0.5:
                positions = self._crossover(*self.rng.sample(parents, 2))
            else:
                positions = self._mutate(self.rng.choice(parents))
            self._add(positions, made, seen)
        return list(made.values())

    def _add(self, positions, made, seen) -> None:
        if not self._meets(positions):
            return
        candidate = self.space.candidate(positions)
        if candidate.key() not in made and candidate.key() not in seen:
            made[candidate.key()] = candidate

    def _random_fill(self) -> List[int]:
        """A random subnet close to the limits: a uniform width below the widest that fits, each unit moved
        down by up to one option, then random units widened one option at a time while the limits allow."""
        t = self.rng.uniform(0.0, self.widest)
        positions = [self._clip(i, p - self.rng.choice((0, 1))) for i, p in
                     enumerate(self.space.uniform_positions(t))]
        growable = [i for i in range(len(positions)) if positions[i] + 1 < len(self.space.options[i])]
        while growable:
            i = self.rng.choice(growable)
            positions[i] += 1
            if not self._meets(positions):
                positions[i] -= 1
                growable.remove(i)
            elif positions[i] + 1 >= len(self.space.options[i]):
                growable.remove(i)
        return positions

    def _positions(self, candidate: Candidate) -> List[int]:
        return [options.index(candidate.counts[unit.name]) for unit, options in
                zip(self.space.units, self.space.options)]

    def _crossover(self, a: Candidate, b: Candidate) -> List[int]:
        return [self.rng.choice(pair) for pair in zip(self._positions(a), self._positions(b))]

    def _mutate(self, parent: Candidate) -> List[int]:
        positions = self._positions(parent)
        return [self._clip(i, p + self.rng.choice((-2, -1, 1, 2))) if self.rng.random() < self.mutation_prob
                else p for i, p in enumerate(positions)]

    def _clip(self, unit_index: int, position: int) -> int:
        return min(max(position, 0), len(self.space.options[unit_index]) - 1)


__all__ = ["search_subnet", "SearchResult", "Candidate", "BatchNormCalibrator", "top1_accuracy",
           "needs_bn_recalibration"]
