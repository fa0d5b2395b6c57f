"""Budgets: the cost model against FlopCounterMode on exported models, FLOPs / params targets met on the export,
group constraints and floors respected, unreachable targets refused with the model unchanged, ItePruneAlgorithm
with a budget, a measured latency target."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.algorithms import ItePruneAlgorithm
from pyprune.budget import (Budget, BudgetError, BudgetPlanner, CostModel, LatencySettings, prune_to_budget,
                            reachable_counts, subnet_cost)
from pyprune.errors import ConfigError
from pyprune.mutators import ChannelMutator, count_flops, count_params


class TinyConvNet(nn.Module):
    """Grouped conv (4 groups), depthwise conv, a concatenation, a residual add and flatten -> linear.
    ``[N, 3, 16, 16] -> [N, 10]``."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.grouped, self.grouped_bn = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16)
        self.dw, self.dw_bn = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw, self.pw_bn = nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.branch_a, self.branch_b = nn.Conv2d(24, 8, 1), nn.Conv2d(24, 8, 3, padding=1)
        self.fuse = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24 * 2 * 2, 10)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(self.grouped_bn(self.grouped(x)))
        x = F.relu(self.dw_bn(self.dw(x)))
        y = F.relu(self.pw_bn(self.pw(x)))
        y = y + self.fuse(torch.cat([self.branch_a(y), self.branch_b(y)], 1))
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


class TinyAttention(nn.Module):
    """Token embedding, 4-head self-attention, LayerNorm, MLP. ``[N, 6, 12] -> [N, 10]``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        x = x + self.mlp(self.norm(x))
        return self.head(x.mean(1))


NETS = {"conv": (TinyConvNet, (2, 3, 16, 16)), "attention": (TinyAttention, (2, 6, 12))}


def prepared(kind="conv", unit="L1MutableChannelUnit", **unit_args):
    cls, shape = NETS[kind]
    model = cls()
    cfg = dict(type=unit, default_args=unit_args) if unit_args else unit
    mutator = ChannelMutator(cfg, parse_cfg=dict(demo_input=shape))
    mutator.prepare_from_supernet(model)
    return model, mutator, torch.randn(shape)


# tiny models gain nothing from a second thread, and lose much on a shared, oversubscribed CPU
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(autouse=True)
def _no_attention_fast_path():
    """The exported nn.MultiheadAttention's eval fast path is one native op FlopCounterMode does not count; the
    slow path (what the dynamic op runs) is what both sides count here."""
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(True)


def exported_cost(model, mutator, x):
    small = mutator.export(model)
    return count_flops(small, (x,)), count_params(small)


# ------------------------------------------------------------------------------------------------ cost model
@pytest.mark.parametrize("kind", sorted(NETS))
def test_cost_model_equals_flop_counter_on_the_exported_model(kind):
    model, mutator, x = prepared(kind)
    cost_model = CostModel.from_model(model, mutator, x)
    assert cost_model.full() == cost_model.cost()
    assert (cost_model.full().flops, cost_model.full().params) == exported_cost(model, mutator, x)
    for _ in range(4):
        mutator.set_choices(mutator.sample_choices())
        flops, params = exported_cost(model, mutator, x)
        assert cost_model.cost() == cost_model.cost({u.name: u.active_channels for u in mutator.units})
        assert (cost_model.cost().flops, cost_model.cost().params) == (flops, params)


def test_subnet_cost_counts_the_current_choices_without_export():
    model, mutator, x = prepared("conv")
    mutator.set_global_ratio(0.5)
    cost = subnet_cost(model, mutator, x)
    assert (cost.flops, cost.params) == exported_cost(model, mutator, x)
    assert model.pw.active_out_channels == 12   # still the dynamic model, at the same choices


@pytest.mark.parametrize("kind", sorted(NETS))
def test_a_cost_model_built_at_pruned_choices_counts_every_other_choice_exactly(kind):
    model, mutator, x = prepared(kind)
    mutator.set_global_ratio(0.5)
    cost_model = CostModel.from_model(model, mutator, x)  # every layer's calls are recorded at about half width
    mutator.set_global_ratio(1.0)
    assert (cost_model.cost().flops, cost_model.cost().params) == exported_cost(model, mutator, x)
    mutator.set_choices(mutator.sample_choices())
    assert (cost_model.cost().flops, cost_model.cost().params) == exported_cost(model, mutator, x)


def test_cost_model_counts_a_torchvision_model_exactly():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 32, 32)))
    mutator.prepare_from_supernet(model)
    x = torch.randn(1, 3, 32, 32)
    cost_model = CostModel.from_model(model, mutator, x)
    mutator.set_choices(mutator.sample_choices())
    assert (cost_model.cost().flops, cost_model.cost().params) == exported_cost(model, mutator, x)


def test_channel_cost_is_the_cost_of_one_channel():
    model, mutator, x = prepared("conv")
    cost_model = CostModel.from_model(model, mutator, x)
    pos = cost_model.positions["pw_(0, 24)_24"]
    full = cost_model.full_counts
    fewer = list(full)
    fewer[pos] -= 1
    expected = cost_model.cost(full).flops - cost_model.cost(fewer).flops
    assert cost_model.channel_cost(pos, full, full[pos] - 1, "flops") == pytest.approx(expected)
    assert expected > 0


# ----------------------------------------------------------------------------------------------- targets met
@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("kind,metric,fraction", [("conv", "flops", 0.5), ("conv", "params", 0.4),
                                                   ("attention", "flops", 0.6), ("attention", "params", 0.5)])
def test_target_is_met_on_the_exported_model(kind, metric, fraction, allocation):
    model, mutator, x = prepared(kind)
    result = prune_to_budget(model, mutator, **{metric: fraction}, example_inputs=x, allocation=allocation)
    flops, params = exported_cost(model, mutator, x)
    measured = {"flops": flops, "params": params}[metric]
    limit = fraction * result.full[metric]
    assert measured == result.cost[metric]
    assert measured <= limit
    assert measured > limit - result.granularity[metric]  # within one allocation step of the target
    assert 0 < result.granularity[metric] < 0.5 * result.full[metric]


def test_absolute_and_percent_targets():
    model, mutator, x = prepared("conv")
    full_params = count_params(model)
    result = prune_to_budget(model, mutator, params=int(full_params * 0.6), example_inputs=x)
    assert exported_cost(model, mutator, x)[1] <= int(full_params * 0.6)
    assert Budget(flops="50%").flops == 0.5
    assert result.limits["params"] == int(full_params * 0.6)


def test_flops_and_params_together_meet_both():
    model, mutator, x = prepared("conv")
    result = prune_to_budget(model, mutator, flops=0.7, params=0.5, example_inputs=x)
    flops, params = exported_cost(model, mutator, x)
    assert flops <= 0.7 * result.full.flops and params <= 0.5 * result.full.params


def test_group_constraints_and_divisors_are_respected():
    model, mutator, x = prepared("attention")
    prune_to_budget(model, mutator, flops=0.3, example_inputs=x)
    small = mutator.export(model)
    assert small.attention.embed_dim % 4 == 0 and small.attention.embed_dim < 32   # heads stay whole
    model, mutator, x = prepared("conv")
    prune_to_budget(model, mutator, flops=0.3, example_inputs=x, allocation="uniform")
    small = mutator.export(model)
    assert small.grouped.in_channels % 4 == 0 and small.grouped.out_channels % 4 == 0
    assert small.grouped.groups == 4 and small.dw.groups == small.dw.in_channels == small.dw.out_channels
    model, mutator, x = prepared("conv", divisor=4)   # every count a multiple of 4 (or the full width)
    prune_to_budget(model, mutator, flops=0.4, example_inputs=x)
    for unit in mutator.mutable_units:
        assert unit.active_channels % 4 == 0
    assert reachable_counts(mutator.mutable_units[0]) == [4, 8, 12, 16]


@pytest.mark.parametrize("floor", [0.5, 3, {"pw_(0, 24)_24": 20}])
def test_floor_is_respected(floor):
    model, mutator, x = prepared("conv")
    prune_to_budget(model, mutator, flops=0.3 if not isinstance(floor, float) else 0.45, example_inputs=x,
                    floor=floor)
    for unit in mutator.mutable_units:
        wanted = floor.get(unit.name, 1) if isinstance(floor, dict) else \
            (math.ceil(floor * unit.num_channels) if isinstance(floor, float) else floor)
        assert unit.active_channels >= wanted


def test_default_floor_keeps_one_group():
    model, mutator, x = prepared("conv")
    planner = BudgetPlanner(model, mutator, example_inputs=x)
    floor = planner.floor_cost()
    prune_to_budget(model, mutator, flops=(floor.flops + 1) / planner.full.flops, example_inputs=x)
    counts = {u.name: u.active_channels for u in mutator.mutable_units}
    assert counts["stem_(0, 16)_16"] == 4 and counts["grouped_(0, 16)_16"] == 4   # one channel per group
    assert counts["pw_(0, 24)_24"] == 1


def test_unreachable_target_names_the_floor_and_changes_nothing():
    model, mutator, x = prepared("conv")
    mutator.set_global_ratio(0.75)
    before_choices = dict(mutator.current_choices)
    before_weights = copy.deepcopy(model.state_dict())
    with pytest.raises(BudgetError, match=r"floor.*flops: target .* but the floor is .*nothing was changed"):
        prune_to_budget(model, mutator, flops=0.05, example_inputs=x, floor=0.5)
    assert mutator.current_choices == before_choices
    assert all(torch.equal(before_weights[k], v) for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("bad,match", [
    (dict(flops=0), "positive"), (dict(latency=1.5), r"\(0, 1\]"), (dict(flops="half"), "percentage"),
    (dict(), "at least one"), (dict(params=12.5), "whole number")])
def test_malformed_budgets_are_refused(bad, match):
    with pytest.raises(BudgetError, match=match):
        Budget(**bad)
    with pytest.raises(BudgetError, match="unknown keys"):
        Budget.from_dict({"macs": 0.5})


@pytest.mark.parametrize("option,value,match", [("allocation", "random", "allocation"),
                                                ("importance", "fisher", "importance"),
                                                ("normalization", "sum", "normalization"),
                                                ("floor", {"nope": 2}, "unknown unit"), ("floor", 1.5, "floor"),
                                                ("cost_power", -1, "cost_power")])
def test_bad_planner_options_are_refused(option, value, match):
    model, mutator, x = prepared("conv")
    with pytest.raises(BudgetError, match=match):
        prune_to_budget(model, mutator, flops=0.5, example_inputs=x, **{option: value})
    assert all(u.active_channels == u.num_channels for u in mutator.units)


# ------------------------------------------------------------------------------------------ global allocation
def test_global_allocation_drops_unimportant_channels_first():
    """Zero half of the pw stream's filters: global allocation removes those first and spares the other units;
    uniform allocation cuts every unit alike."""
    model, mutator, x = prepared("conv")
    dead = torch.arange(0, 24, 2)
    with torch.no_grad():  # the stream's channels are the outputs of pw and fuse (residual add)
        model.pw.weight[dead] = 0
        model.fuse.weight[dead] = 0
        model.fuse.bias[dead] = 0
    mutator.set_global_ratio(1.0)
    result = prune_to_budget(model, mutator, params=0.9, example_inputs=x)
    unit = next(u for u in mutator.mutable_units if u.name == "pw_(0, 24)_24")
    dropped = set(range(24)) - set(unit.current_index.tolist())
    assert dropped and dropped <= set(dead.tolist())
    assert all(u.active_channels == u.num_channels for u in mutator.mutable_units if u is not unit)
    assert result.cost.params <= 0.9 * result.full.params
    prune_to_budget(model, mutator, params=0.9, example_inputs=x, allocation="uniform")
    assert all(u.active_channels < u.num_channels for u in mutator.mutable_units)


@pytest.mark.parametrize("options", [dict(normalization="mean"), dict(normalization="max"),
                                     dict(normalization="group_size"), dict(normalization="none"),
                                     dict(cost_power=0), dict(cost_power=0.5)])
def test_normalizations_and_cost_powers_all_meet_the_target(options):
    model, mutator, x = prepared("conv")
    result = prune_to_budget(model, mutator, flops=0.5, example_inputs=x, **options)
    assert exported_cost(model, mutator, x)[0] <= 0.5 * result.full.flops


def test_an_importance_measure_selects_by_index_on_prefix_units():
    """A prefix unit would drop its last channels; with importance='l1' the zeroed first ones go instead."""
    model, mutator, x = prepared("conv", unit="SequentialMutableChannelUnit")
    with torch.no_grad():
        for layer in (model.pw, model.fuse):
            layer.weight[:12] = 0
        model.fuse.bias[:12] = 0
    result = prune_to_budget(model, mutator, params=0.9, example_inputs=x, importance="l1")
    unit = next(u for u in mutator.mutable_units if u.name == "pw_(0, 24)_24")
    dropped = set(range(24)) - set(unit.current_index.tolist())
    assert dropped and dropped <= set(range(12))
    assert exported_cost(model, mutator, x)[1] <= 0.9 * result.full.params


# --------------------------------------------------------------------------------------- iterative schedule
def test_ite_prune_reaches_the_budget_in_prune_times_steps():
    model, mutator, x = prepared("conv")
    algorithm = ItePruneAlgorithm(model, mutator, budget={"flops": 0.4}, prune_times=3,
                                  budget_cfg=dict(example_inputs=x))
    full = algorithm.budget_schedule.planner.full.flops
    kept = []
    for step in range(3):
        assert algorithm.step()
        flops, _ = exported_cost(model, mutator, x)
        assert flops <= (1 - 0.6 * (step + 1) / 3) * full
        kept.append(flops)
    assert not algorithm.step() and algorithm.done
    assert kept[0] > kept[1] > kept[2] > 0.3 * full
    assert algorithm.state_dict()["budget"] == {"flops": 0.4}


def test_ite_prune_refuses_two_targets_or_an_unreachable_budget():
    model, mutator, x = prepared("conv")
    with pytest.raises(ConfigError, match="not both"):
        ItePruneAlgorithm(model, mutator, 0.5, budget={"flops": 0.5})
    with pytest.raises(BudgetError, match="floor"):
        ItePruneAlgorithm(model, mutator, budget={"params": 0.01}, budget_cfg=dict(example_inputs=x, floor=0.5))
    assert all(u.active_channels == u.num_channels for u in mutator.units)


# --------------------------------------------------------------------------------------------------- latency
def flops_as_seconds(model, inputs, settings=None):
    """A deterministic stand-in for the clock (a shared CPU's timings are too noisy for a test): 1 ns per FLOP."""
    return count_flops(model, inputs) * 1e-9


def test_latency_target_keeps_the_largest_subnet_that_measures_under_it(monkeypatch):
    monkeypatch.setattr("pyprune.budget.prune.measure_latency", flops_as_seconds)
    model, mutator, x = prepared("conv")
    result = prune_to_budget(model, mutator, latency=0.6, example_inputs=x)
    assert result.latency.ratio <= 0.6
    assert result.latency.ratio == pytest.approx(exported_cost(model, mutator, x)[0] / result.full.flops)
    assert result.latency.ratio > 0.5   # bisection gets close to the target from below
    assert "median of 10 timed eval forwards" in result.latency.method and "latency" in str(result)


def test_unreachable_latency_target_restores_the_units(monkeypatch):
    monkeypatch.setattr("pyprune.budget.prune.measure_latency", lambda model, inputs, settings=None: 1.0)
    model, mutator, x = prepared("conv")
    mutator.set_global_ratio(0.75)
    before = {u.name: u.current_index.tolist() for u in mutator.mutable_units}
    with pytest.raises(BudgetError, match="latency target 50.0% cannot be met.*floor.*100.0%"):
        prune_to_budget(model, mutator, latency=0.5, example_inputs=x)
    assert {u.name: u.current_index.tolist() for u in mutator.mutable_units} == before


def test_measure_latency_times_real_forwards():
    from pyprune.budget import measure_latency
    model, _, x = prepared("conv")
    seconds = measure_latency(model, (x,), LatencySettings(warmup=0, repeats=2))
    assert 0 < seconds < 10 and model.training
    with pytest.raises(ValueError, match="repeats"):
        LatencySettings(repeats=0)
