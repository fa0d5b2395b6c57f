"""How many channels each unit keeps so that the model meets a cost limit: uniform or global allocation.

Both work on *ladders*: the counts a unit can take (what its rounding -- ``divisor``, ``min_value``, ``groups``,
slimmable candidates -- lets a choice produce), from its floor up to its starting count. Both return the cheapest
change that meets every limit along their own order, found by bisection on the exact cost model, so the result
costs at most the limit and less than one step (``granularity``) below it.

* **uniform**: every unit keeps the same ratio ``r`` (its largest ladder count ``<= r * num_channels``); the
  largest ``r`` that meets the limits. The baseline.
* **global**: every ladder step (one channel, or one per group, or one divisor's worth) of every unit is scored by
  the normalised importance of the channels it drops divided by what one channel of that unit costs, and steps are
  taken lowest score first, until the limits are met. Within a unit steps keep their order (a running maximum of
  the scores), so a unit always drops its least important channels first. What a channel costs depends on the
  widths of its neighbours (a conv's FLOPs are ``in * out``), so the costs are computed with the other units at
  full width, then once more at the first solution (``passes=2``).
"""
import bisect
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

from ..channels import ratio_to_count
from .cost import METRICS, CostModel
from .errors import BudgetError
from .importance import UnitRanking

ALLOCATIONS = ("global", "uniform")
AUTO_FLOOR = "auto"
# The default floor of global allocation, as a fraction of a unit's channels. Importance per cost can cut a unit far
# below what uniform allocation keeps (a cheap-looking residual stream thinned to one channel bottlenecks the whole
# network), so no unit goes below a quarter of its width -- or below half of what uniform allocation keeps it at,
# when that is less, so that any budget uniform allocation meets stays reachable.
GLOBAL_FLOOR_FRACTION = 0.25


@dataclass
class Ladder:
    """The counts unit ``units[pos]`` may take here, ascending: ``counts[0]`` is its floor, ``counts[-1]`` where it
    starts."""
    pos: int
    unit: object
    counts: List[int]


@dataclass
class Allocation:
    """Kept counts aligned with the cost model's units, and per metric how much the next larger candidate along the
    allocation's order would have cost on top (the step the limit stopped)."""
    counts: List[int]
    granularity: Dict[str, float]


# --------------------------------------------------------------------------------------------------- ladders
def reachable_counts(unit) -> List[int]:
    """Every count a choice of ``unit`` can keep (its rounding applied), ascending; counts that a choice maps back
    to exactly, so ``unit.choice_to_count(unit.count_to_choice(c)) == c``."""
    counts = set()
    for asked in range(1, unit.num_channels + 1):
        try:
            counts.add(unit.width_to_count(unit.count_to_choice(asked)))
        except ValueError:  # a slimmable unit takes its candidate widths only
            continue
    return sorted(c for c in counts if _round_trips(unit, c))


def _round_trips(unit, count: int) -> bool:
    try:
        return unit.width_to_count(unit.count_to_choice(count)) == count
    except ValueError:
        return False


def floor_count(unit, floor, reachable: Sequence[int]) -> int:
    """The smallest reachable count that honours ``floor`` for ``unit``.

    ``floor``: None (the unit's smallest count: one channel, one per group or its divisor / ``min_value``), a
    fraction in (0, 1] of the unit's channels, an int count, or a dict ``{unit name: fraction or count}`` (units
    not named: None).
    """
    if isinstance(floor, Mapping):
        floor = floor.get(unit.name)
    if floor is None:
        return reachable[0]
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor) or floor <= 0:
        raise BudgetError(f"floor must be a fraction in (0, 1], a channel count >= 1, a dict of those or None; got "
                          f"{floor!r} for unit {unit.name}")
    wanted = floor * unit.num_channels if isinstance(floor, float) and floor <= 1.0 else min(floor,
                                                                                             unit.num_channels)
    index = bisect.bisect_left(reachable, wanted - 1e-9)
    return reachable[min(index, len(reachable) - 1)]


def auto_floor(ladders: Sequence[Ladder], uniform_counts: Sequence[int]) -> Dict[str, int]:
    """The default floor of global allocation per unit name: ``GLOBAL_FLOOR_FRACTION`` of its channels (rounded up),
    or half of its count under uniform allocation (``uniform_counts``, aligned with the cost model) when that is
    less; at least one channel. Every floor is at most the uniform count, so uniform's plan stays in reach."""
    floors = {}
    for ladder in ladders:
        unit, uniform = ladder.unit, uniform_counts[ladder.pos]
        floors[unit.name] = max(1, min(math.ceil(GLOBAL_FLOOR_FRACTION * unit.num_channels), uniform // 2))
    return floors


def check_floor(floor, unit_names) -> None:
    """Reject a malformed floor before anything is computed (unknown unit names included)."""
    if floor == AUTO_FLOOR:
        return
    if isinstance(floor, Mapping):
        unknown = sorted(str(name) for name in floor if name not in unit_names)
        if unknown:
            raise BudgetError(f"floor: unknown unit names {unknown}")
        values = list(floor.values())
    else:
        values = [floor]
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 \
                or (isinstance(value, float) and value > 1.0):
            raise BudgetError(f"floor must be 'auto', a fraction in (0, 1], an int channel count >= 1, a dict of "
                              f"those or None; got {value!r}")


def build_ladders(cost_model: CostModel, floor, start: Sequence[int]) -> List[Ladder]:
    """One ladder per mutable unit, from its floor up to ``start[pos]`` (never below the floor)."""
    ladders = []
    for pos, unit in enumerate(cost_model.units):
        if not unit.is_mutable:
            continue
        reachable = reachable_counts(unit)
        low = floor_count(unit, floor, reachable)
        top = max(low, start[pos])
        counts = [c for c in reachable if low <= c <= top]
        if counts[-1] != top:
            counts.append(top)  # the starting count itself, even when no choice rounds to it
        ladders.append(Ladder(pos, unit, counts))
    return ladders


def counts_at(base: Sequence[int], ladders: Sequence[Ladder], which: str) -> List[int]:
    """``base`` with every ladder's unit at its ``'bottom'`` (floor) or ``'top'`` (start)."""
    counts = list(base)
    for ladder in ladders:
        counts[ladder.pos] = ladder.counts[0] if which == "bottom" else ladder.counts[-1]
    return counts


def meets(cost_model: CostModel, counts: Sequence[int], limits: Mapping[str, float]) -> bool:
    cost = cost_model.cost(counts)
    return all(cost[m] <= limits[m] for m in limits)


def _granularity(cost_model: CostModel, chosen: Sequence[int], larger: Sequence[int]) -> Dict[str, float]:
    chosen_cost, larger_cost = cost_model.cost(chosen), cost_model.cost(larger)
    return {m: float(larger_cost[m] - chosen_cost[m]) for m in METRICS}


# --------------------------------------------------------------------------------------------------- uniform
def count_at_ratio(ladder: Ladder, ratio: float) -> int:
    """What uniform allocation keeps of ``ladder``'s unit at kept ``ratio`` in (0, 1]: the largest ladder count at
    most the count :func:`pyprune.channels.ratio_to_count` names (the rule every ratio entry point uses), or the
    ladder's floor when even that is more."""
    named = ratio_to_count(ratio, ladder.unit.num_channels)
    return ladder.counts[max(bisect.bisect_right(ladder.counts, named) - 1, 0)]


def allocate_uniform(cost_model: CostModel, ladders: Sequence[Ladder], limits: Mapping[str, float],
                     base: Sequence[int]) -> Allocation:
    """The largest common ratio whose counts meet ``limits`` (the floors must meet them; callers check)."""
    if not ladders:
        return Allocation(list(base), {m: 0.0 for m in METRICS})
    ratios = sorted({c / ladder.unit.num_channels for ladder in ladders for c in ladder.counts})

    def counts_for(ratio: float) -> List[int]:
        counts = list(base)
        for ladder in ladders:
            counts[ladder.pos] = count_at_ratio(ladder, ratio)
        return counts

    low, high = 0, len(ratios) - 1  # ratios[low] meets the limits (it gives the floors), find the last that does
    if meets(cost_model, counts_for(ratios[high]), limits):
        return Allocation(counts_for(ratios[high]), {m: 0.0 for m in METRICS})
    while high - low > 1:
        middle = (low + high) // 2
        if meets(cost_model, counts_for(ratios[middle]), limits):
            low = middle
        else:
            high = middle
    chosen = counts_for(ratios[low])
    return Allocation(chosen, _granularity(cost_model, chosen, counts_for(ratios[high])))


# ---------------------------------------------------------------------------------------------------- global
def allocate_global(cost_model: CostModel, ladders: Sequence[Ladder], rankings: Mapping[int, UnitRanking],
                    limits: Mapping[str, float], base: Sequence[int], rank_metric: str,
                    passes: int = 2, cost_power: float = 1.0) -> Allocation:
    """Drop the lowest-scoring ladder steps (importance / channel cost) until ``limits`` are met.

    ``rankings``: per unit position, its :class:`UnitRanking`. ``rank_metric``: the cost a channel's importance is
    divided by (``'flops'`` or ``'params'``), raised to ``cost_power`` (1: importance per cost, mmrazor's
    GroupFisher; 0: importance alone, Torch-Pruning's global ranking). ``base``: counts of the units without a
    ladder (fixed ones).
    """
    reference = counts_at(base, ladders, "top")
    allocation = None
    for _ in range(max(1, passes)):
        steps = _scored_steps(cost_model, ladders, rankings, reference, rank_metric, cost_power)
        allocation = _cheapest_prefix(cost_model, ladders, steps, limits, base)
        reference = allocation.counts
    return allocation


def _scored_steps(cost_model, ladders, rankings, reference, metric, cost_power) -> List[Tuple[int, int]]:
    """Every ladder step as ``(unit position, count after the step)``, lowest score first."""
    keyed = []
    for ladder in ladders:
        ranking, counts, pos = rankings[ladder.pos], ladder.counts, ladder.pos
        num_channels = ladder.unit.num_channels
        around = list(reference)
        around[pos] = counts[-1]
        channel_cost = cost_model.channel_cost(pos, around, counts[0], metric)
        running = -math.inf
        for order, high_index in enumerate(range(len(counts) - 1, 0, -1)):
            high, low = counts[high_index], counts[high_index - 1]
            dropped = ranking.scores[num_channels - high:num_channels - low]
            running = max(running, float(dropped.mean()))  # never before a step of the same unit that precedes it
            score = running / channel_cost ** cost_power if channel_cost > 0 else math.inf
            keyed.append(((score, pos, order), (pos, low)))
    keyed.sort(key=lambda item: item[0])
    return [step for _, step in keyed]


def _cheapest_prefix(cost_model, ladders, steps, limits, base) -> Allocation:
    """The fewest steps (taken in order) whose result meets ``limits``; bisection (cost falls with every step)."""
    start = counts_at(base, ladders, "top")
    if not steps:
        return Allocation(start, {m: 0.0 for m in METRICS})

    def after(k: int) -> List[int]:
        counts = list(start)
        for pos, low in steps[:k]:
            counts[pos] = low
        return counts

    if meets(cost_model, start, limits):
        return Allocation(start, {m: 0.0 for m in METRICS})
    low, high = 0, len(steps)  # after(low) misses the limits, after(high) (every unit at its floor) meets them
    while high - low > 1:
        middle = (low + high) // 2
        if meets(cost_model, after(middle), limits):
            high = middle
        else:
            low = middle
    chosen = after(high)
    return Allocation(chosen, _granularity(cost_model, chosen, after(high - 1)))


__all__ = ["ALLOCATIONS", "AUTO_FLOOR", "GLOBAL_FLOOR_FRACTION", "auto_floor", "Ladder", "Allocation", "reachable_counts", "floor_count", "check_floor", "count_at_ratio",
           "build_ladders", "counts_at", "meets", "allocate_uniform", "allocate_global"]
