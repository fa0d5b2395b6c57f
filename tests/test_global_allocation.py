"""Global allocation with cost-normalised importance and a floor per unit: a residual network pruned to 50 % FLOPs
keeps every unit at or above its floor, meets the target on the exported model within one allocation step, keeps
exactly the highest-Taylor channels of each unit, and the export computes what the dynamic model computes. The
default floor ('auto') is a quarter of each unit or half its uniform count; the default normalisation ('auto')
compares Taylor importance raw (one scale: the loss) and magnitudes per unit mean."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pyprune.budget import BudgetError, BudgetPlanner, prune_to_budget, search_subnet
from pyprune.budget.allocation import GLOBAL_FLOOR_FRACTION
from pyprune.budget.importance import rank_unit
from pyprune.mutators import ChannelMutator, count_flops

SIZE = 16
FLOOR = 0.25


def prepared(unit_type):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    mutator = ChannelMutator(unit_type, parse_cfg=dict(demo_input=(1, 3, SIZE, SIZE)))
    mutator.prepare_from_supernet(model)
    return model, mutator


def accumulate_taylor(model, mutator, batches=2):
    generator = torch.Generator().manual_seed(1)
    for _ in range(batches):
        x = torch.randn(4, 3, SIZE, SIZE, generator=generator)
        y = torch.randint(0, 5, (4,), generator=generator)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for unit in mutator.mutable_units:
            unit.update_importance()
    model.zero_grad()


@pytest.mark.parametrize("unit_type", ["L1MutableChannelUnit", "TaylorMutableChannelUnit"])
def test_global_with_floor_meets_the_target_and_keeps_every_unit_above_its_floor(unit_type):
    model, mutator = prepared(unit_type)
    if unit_type == "TaylorMutableChannelUnit":
        accumulate_taylor(model, mutator)
    x = torch.randn(2, 3, SIZE, SIZE)
    full_flops = count_flops(model, (x[:1],))
    result = prune_to_budget(model, mutator, flops=0.5, allocation="global", floor=FLOOR)
    for unit in mutator.mutable_units:
        assert unit.active_channels >= math.ceil(FLOOR * unit.num_channels) - unit.groups + 1, unit.name
    model.eval()
    with torch.no_grad():
        dynamic = model(x)
        small = mutator.export(model).eval()
        exported = small(x)
    torch.testing.assert_close(exported, dynamic, rtol=1e-4, atol=1e-5)  # float32, summation order may differ
    flops = count_flops(small, (x[:1],))
    assert flops <= 0.5 * full_flops
    assert 0.5 * full_flops - flops < result.granularity["flops"] + 1  # within one step of the allocation
    # global allocation is not uniform: the units end at different kept fractions
    fractions = {round(u.active_channels / u.num_channels, 3) for u in mutator.mutable_units}
    assert len(fractions) > 2


def test_global_taylor_keeps_each_units_highest_taylor_channels():
    model, mutator = prepared("TaylorMutableChannelUnit")
    accumulate_taylor(model, mutator)
    scores = {u.name: u.channel_importance().clone() for u in mutator.mutable_units}
    prune_to_budget(model, mutator, flops=0.5, allocation="global", floor=FLOOR)
    checked = 0
    for unit in mutator.mutable_units:
        if unit.groups != 1 or unit.active_channels == unit.num_channels:
            continue
        mask = torch.zeros(unit.num_channels, dtype=torch.bool)
        mask[unit.current_index.cpu()] = True
        kept, dropped = scores[unit.name][mask], scores[unit.name][~mask]
        assert kept.min() >= dropped.max(), unit.name
        checked += 1
    assert checked > 0


# ---------------------------------------------------------------------------------- the default floor ('auto')
def expected_auto_floor(unit, uniform_count):
    return max(1, min(math.ceil(GLOBAL_FLOOR_FRACTION * unit.num_channels), uniform_count // 2))


@pytest.mark.parametrize("flops", [0.5, 0.05])
def test_default_floor_is_a_quarter_of_each_unit_or_half_its_uniform_count(flops):
    """At 50 % FLOPs uniform keeps ~70 % of every unit, so the quarter binds; at 5 % it keeps ~22 %, so half of
    that binds and the budget stays reachable (a fixed 0.25 floor could not meet it)."""
    model, mutator = prepared("L1MutableChannelUnit")
    uniform = BudgetPlanner(model, mutator, allocation="uniform").plan({"flops": flops}).counts
    with pytest.raises(BudgetError, match="floor=0.25"):
        prune_to_budget(model, mutator, flops=0.05, allocation="global", floor=0.25)
    result = prune_to_budget(model, mutator, flops=flops, allocation="global")  # floor='auto'
    assert result.cost.flops <= flops * result.full.flops
    at_floor = 0
    for unit in mutator.mutable_units:
        floor = expected_auto_floor(unit, uniform[unit.name])
        assert unit.active_channels >= floor, (unit.name, unit.active_channels, floor)
        at_floor += unit.active_channels < floor + unit.groups
    assert at_floor > 0  # the floor is what stopped global allocation somewhere (it binds)


def test_uniform_allocation_ignores_the_auto_floor():
    model, mutator = prepared("L1MutableChannelUnit")
    auto = BudgetPlanner(model, mutator, allocation="uniform").plan({"flops": 0.05}).counts
    none = BudgetPlanner(model, mutator, allocation="uniform", floor=None).plan({"flops": 0.05}).counts
    assert auto == none


def test_search_refuses_the_auto_floor():
    model, mutator = prepared("L1MutableChannelUnit")
    with pytest.raises(BudgetError, match="floor='auto'"):
        search_subnet(model, mutator, [], flops=0.5, floor="auto")


# ------------------------------------------------------------------------------- normalisation ('auto')
class TwoConvNet(nn.Module):
    """conv_a (3 -> 16) -> conv_b (16 -> 16) -> pool -> fc: unit A (conv_a's outputs) costs more per channel than
    unit B (it feeds conv_b's 16 outputs and is fed by 3 inputs; B feeds only the fc)."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv_b, self.bn_b = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x))))))
        return self.fc(x.mean((2, 3)))


def two_unit_taylor(scale_a, scale_b):
    """TwoConvNet with Taylor units whose importance is set: A's channels ``scale_a * (1..16)``, B's ``scale_b *
    (1..16)``; returns the model, mutator and the units keyed 'a' / 'b'."""
    torch.manual_seed(0)
    model = TwoConvNet()
    mutator = ChannelMutator("TaylorMutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    mutator.prepare_from_supernet(model)
    units = {}
    for unit in mutator.mutable_units:
        key = "a" if any("conv_a" in ref.name for ref in unit.output_related) else "b"
        scale = scale_a if key == "a" else scale_b
        unit.load_importance_state_dict({"importance": scale * torch.arange(1.0, 17.0), "num_updates": 1})
        units[key] = unit
    assert set(units) == {"a", "b"}
    return model, mutator, units


def test_auto_normalisation_keeps_taylor_raw_and_divides_magnitudes_by_their_mean():
    model, mutator, units = two_unit_taylor(100.0, 1.0)
    ranking = rank_unit(model, units["a"])  # auto
    torch.testing.assert_close(ranking.scores, 100.0 * torch.arange(1.0, 17.0))  # raw, in drop order (ascending)
    magnitude = rank_unit(model, units["a"], importance="l1")
    assert magnitude.scores.mean().item() == pytest.approx(1.0, rel=1e-5)
    own_but_mean = rank_unit(model, units["a"], normalization="mean")
    assert own_but_mean.scores.mean().item() == pytest.approx(1.0, rel=1e-5)


def test_global_taylor_takes_channels_from_the_unit_that_matters_less_even_when_it_is_cheaper():
    """A's Taylor importance is 100x B's, A costs more per channel: importance per FLOP (raw Taylor) cuts B; with
    per-unit mean normalisation both units look alike and the costlier A is cut instead."""
    model, mutator, units = two_unit_taylor(100.0, 1.0)
    prune_to_budget(model, mutator, flops=0.8, allocation="global", floor=None)
    raw = {k: u.active_channels for k, u in units.items()}
    assert raw["a"] == 16 and raw["b"] < 16, raw
    model, mutator, units = two_unit_taylor(100.0, 1.0)
    prune_to_budget(model, mutator, flops=0.8, allocation="global", floor=None, normalization="mean")
    mean = {k: u.active_channels for k, u in units.items()}
    assert mean["a"] < 16, mean
