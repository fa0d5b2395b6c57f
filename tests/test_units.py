"""MutableChannelUnits and LayerIndexAssembler on a small hand-described conv net.

The net (tests/models.py ``SmallNet``) has conv-bn-relu, a residual add, a concat, a depthwise conv, a grouped conv
and flatten -> linear; its UnitSpecs are written by hand there (``small_net_specs``) so these tests do not depend on
the tracer (the real ``pyprune.ops`` runs them).
"""
import importlib
import json
import math

import pytest
import torch
from torch import nn

import pyprune.units as units_pkg
from models import SmallNet, in_ref, out_ref, small_net_specs
from pyprune.errors import ChannelSelectionError, ConfigError
from pyprune.tracing import UnitSpec
from pyprune.units import (UNITS, BNScaleMutableChannelUnit, L1MutableChannelUnit, L2MutableChannelUnit,
                           LayerIndexAssembler, OneShotMutableChannelUnit, SequentialMutableChannelUnit,
                           SlimmableChannelUnit, TaylorMutableChannelUnit, kept_channel_count, make_divisible)
from pyprune.units import modules as unit_modules


# ----------------------------------------------------------------------------------------------------- DynamicOps
@pytest.fixture
def ops():
    return importlib.import_module("pyprune.ops")


def export_model(model: nn.Module, ops) -> nn.Module:
    """Replace every DynamicOp of ``model`` (in place) by its exported plain module."""
    replacements = {name: m.export() for name, m in model.named_modules() if isinstance(m, ops.DynamicChannelMixin)}
    unit_modules.replace_modules(model, replacements)
    return model


# Most tests here speak ratios: units are built in ratio mode without min_ratio unless a test says otherwise
# (mmrazor's defaults, number mode and min_ratio=0.9, are checked in test_unit_name_and_defaults).
RATIO_MODE = dict(choice_mode="ratio", min_ratio=0.0)


def build_units(unit_type=SequentialMutableChannelUnit, **init_args):
    return [unit_type.from_spec(spec, **{**RATIO_MODE, **init_args}) for spec in small_net_specs()]


def prepared_small_net(unit_type=SequentialMutableChannelUnit, **init_args):
    model = SmallNet().eval()
    units = [u for u in build_units(unit_type, **init_args) if u.is_mutable]
    for unit in units:
        unit.prepare_for_pruning(model)
    LayerIndexAssembler(units).attach(model)
    return model, {u.name: u for u in units}


# ------------------------------------------------------------------------------------------------------ rounding
@pytest.mark.parametrize("value, divisor, min_value, min_ratio, expected", [
    (41.0, 1, 1, 0.0, 41), (41.0, 8, 1, 0.0, 40), (44.0, 8, 1, 0.0, 48), (3.0, 8, 8, 0.0, 8),
    (3.0, 8, 1, 0.0, 8), (3.0, 1, 1, 0.0, 3), (11.0, 8, 1, 0.9, 16), (11.0, 8, 1, 0.0, 8), (0.4, 1, 1, 0.0, 1),
])
def test_make_divisible(value, divisor, min_value, min_ratio, expected):
    assert make_divisible(value, divisor, min_value, min_ratio) == expected


@pytest.mark.parametrize("asked, kw, expected", [
    (64 * 0.5, dict(), 32), (64 * 0.3, dict(divisor=8), 16), (64 * 0.99, dict(divisor=8), 64),
    (2.0, dict(min_value=4), 4), (100.0, dict(), 64), (5.0, dict(groups=4), 4), (7.0, dict(groups=4), 8),
    (1.0, dict(groups=4), 4), (62.0, dict(groups=4), 64),
])
def test_kept_channel_count_clamps_and_balances_groups(asked, kw, expected):
    kept = kept_channel_count(asked, 64, **kw)
    assert kept == expected
    assert kept % kw.get("groups", 1) == 0 and 1 <= kept <= 64


# -------------------------------------------------------------------------------------------- choices and checks
def _unit(size=16, unit_type=SequentialMutableChannelUnit, groups=1, **init_args):
    spec = UnitSpec(size, [out_ref("a", 0, size)], [in_ref("b", 0, size)], groups=groups)
    return unit_type.from_spec(spec, **{**RATIO_MODE, **init_args})


def test_unit_name_and_defaults():
    unit = SequentialMutableChannelUnit.from_spec(UnitSpec(16, [out_ref("a", 0, 16)], [in_ref("b", 0, 16)]))
    assert unit.name == "a_(0, 16)_16"
    assert unit.current_choice == 16 and unit.is_mutable
    assert unit.init_args == {"num_channels": 16, "choice_mode": "number", "divisor": 1, "min_value": 1,
                              "min_ratio": 0.9}  # mmrazor's defaults


def test_ratio_choice_rounds_and_reports_realized_ratio():
    unit = _unit(64, divisor=8)
    unit.current_choice = 0.3  # 19.2 channels -> 16
    assert unit.active_channels == 16 and unit.current_choice == 0.25
    assert torch.equal(unit.current_index, torch.arange(16))
    unit.current_choice = unit.current_choice  # the reported value is a fixed point
    assert unit.active_channels == 16


def test_number_mode_choice_and_min_value():
    unit = _unit(16, choice_mode="number", min_value=4)
    unit.current_choice = 2
    assert unit.current_choice == 4 and unit.current_mask.sum() == 4
    unit.current_choice = 16
    assert unit.current_choice == 16


def test_groups_keep_the_same_count_per_group():
    unit = _unit(12, groups=3)
    unit.current_choice = 0.5  # 6 channels -> 2 per group of 4
    assert unit.current_index.tolist() == [0, 1, 4, 5, 8, 9]
    unit.current_choice = 0.1  # 1.2 -> at least one per group
    assert unit.current_index.tolist() == [0, 4, 8]


def test_mask_and_index_agree():
    unit = _unit(10)
    unit.current_choice = 0.7
    mask = unit.current_mask
    assert mask.dtype == torch.bool and mask.shape == (10,)
    assert torch.equal(torch.nonzero(mask).flatten(), unit.current_index)
    assert unit.current_index.dtype == torch.int64


@pytest.mark.parametrize("mode, bad", [
    ("ratio", float("nan")), ("ratio", 0.0), ("ratio", 1.5), ("ratio", -0.2), ("ratio", "0.5"), ("ratio", None),
    ("ratio", True), ("ratio", torch.tensor(0.5)), ("ratio", float("inf")), ("number", 0), ("number", 17),
    ("number", 2.5), ("number", "4"), ("number", False), ("number", -3),
])
def test_bad_choice_raises_naming_the_unit_and_changes_nothing(mode, bad):
    unit = _unit(16, choice_mode=mode)
    unit.current_choice = 0.5 if mode == "ratio" else 8
    before_index, before_version = unit.current_index.clone(), unit.version
    with pytest.raises(ChannelSelectionError, match=r"a_\(0, 16\)_16"):
        unit.current_choice = bad
    assert torch.equal(unit.current_index, before_index) and unit.version == before_version


@pytest.mark.parametrize("init_args, message", [
    (dict(choice_mode="percent"), "choice_mode"), (dict(divisor=0), "divisor"), (dict(min_value=0), "min_value"),
    (dict(min_ratio=1.5), "min_ratio"), (dict(divisor=2.5), "divisor"), (dict(bogus=1), "bogus"),
    (dict(num_channels=15), "num_channels"),
])
def test_bad_init_args_raise_config_error(init_args, message):
    with pytest.raises(ConfigError, match=message):
        _unit(16, **init_args)


def test_bad_groups_raise_config_error():
    with pytest.raises(ConfigError, match="groups"):
        _unit(10, groups=3)


def test_fixed_unit_only_accepts_full_width():
    spec = UnitSpec(4, [out_ref("a", 0, 4)], [in_ref("b", 0, 4)], fixed=True, reason="model output")
    unit = SequentialMutableChannelUnit.from_spec(spec)
    assert not unit.is_mutable
    unit.current_choice = 1.0
    with pytest.raises(ChannelSelectionError, match="model output"):
        unit.current_choice = 0.5


def test_sample_choice_is_valid_and_reproducible():
    unit = _unit(32, divisor=4)
    torch.manual_seed(1)
    samples = [unit.sample_choice() for _ in range(20)]
    torch.manual_seed(1)
    assert samples == [unit.sample_choice() for _ in range(20)]
    for choice in samples:
        assert unit.choice_to_count(choice) % 4 == 0
        assert unit.choice_to_count(choice) == round(choice * 32)
    assert len(set(samples)) > 1


def test_one_shot_samples_from_candidates():
    unit = _unit(16, OneShotMutableChannelUnit, candidate_choices=[0.25, 0.5, 1.0])
    assert unit.current_choice == 1.0 and unit.min_choice == 0.25 and unit.max_choice == 1.0
    assert {unit.sample_choice() for _ in range(50)} == {0.25, 0.5, 1.0}
    unit.current_choice = 0.75  # any valid choice may still be set
    assert unit.current_index.tolist() == list(range(12))
    with pytest.raises(ConfigError, match="candidate_choices"):
        _unit(16, OneShotMutableChannelUnit, candidate_choices=[0.5, 2.0])
    assert _unit(16, OneShotMutableChannelUnit, candidate_choices=[]).candidate_choices == [1.0]  # full width


def test_slimmable_rejects_widths_outside_its_list():
    unit = _unit(16, SlimmableChannelUnit, candidate_choices=[4, 8, 16], choice_mode="number")
    assert unit.choice_mode == "number" and unit.current_choice == 16
    unit.current_choice = 8
    assert unit.current_index.tolist() == list(range(8))
    with pytest.raises(ChannelSelectionError, match="candidate"):
        unit.current_choice = 6
    assert unit.current_choice == 8
    assert unit.sample_choice() in (4, 8, 16)
    assert unit.init_args["candidate_choices"] == [4, 8, 16]


def test_registry_and_unknown_type():
    assert set(UNITS) >= {"SequentialMutableChannelUnit", "L1MutableChannelUnit", "L2MutableChannelUnit",
                          "BNScaleMutableChannelUnit", "TaylorMutableChannelUnit", "OneShotMutableChannelUnit",
                          "SlimmableChannelUnit"}
    with pytest.raises(ConfigError, match="L1MutableChannelUnit"):  # the message lists the known types
        units_pkg.unit_class("L3MutableChannelUnit")


def test_config_template_layout_is_json_and_mmrazor_like():
    unit = build_units()[5]  # gconv -> fc with expand 4
    unit.current_choice = 0.5
    config = unit.config_template(with_init_args=True, with_channels=True)
    json.dumps(config)
    assert config["choice"] == 0.5
    assert config["init_args"]["num_channels"] == 8
    assert config["channels"]["output_related"] == [
        {"name": "gconv", "start": 0, "end": 8, "is_output_channel": True}]
    assert config["channels"]["input_related"] == [
        {"name": "fc", "start": 0, "end": 32, "is_output_channel": False, "expand": 4}]
    assert set(unit.config_template()) == {"choice"}


# ----------------------------------------------------------------------------------------- importance selection
def _conv_pair(out_channels=8):
    """producer conv (4 -> C) feeding consumer conv (C -> 3): one unit of C channels."""
    model = nn.Sequential(nn.Conv2d(4, out_channels, 1), nn.Conv2d(out_channels, 3, 1)).eval()
    spec = UnitSpec(out_channels, [out_ref("0", 0, out_channels)], [in_ref("1", 0, out_channels)])
    return model, spec


def _prepared(unit_type, model, spec, **init_args):
    unit = unit_type.from_spec(spec, **{**RATIO_MODE, **init_args})
    unit.prepare_for_pruning(model)
    return unit


@pytest.mark.parametrize("unit_type", [L1MutableChannelUnit, L2MutableChannelUnit])
def test_magnitude_units_keep_the_largest_rows(unit_type):
    model, spec = _conv_pair()
    with torch.no_grad():
        model[0].weight.normal_(0, 0.01)
        model[0].weight[3] += 1.0
        model[0].weight[5] -= 2.0
    unit = _prepared(unit_type, model, spec, choice_mode="number")
    unit.current_choice = 2
    assert unit.current_index.tolist() == [3, 5]
    # Recomputed when the choice is set again after the weights changed.
    with torch.no_grad():
        model[0].weight[1] += 10.0
    unit.current_choice = 2
    assert unit.current_index.tolist() == [1, 5]


def test_l1_and_l2_differ_on_peaked_rows():
    model, spec = _conv_pair(2)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[4.0, 0, 0, 0], [1.5, 1.5, 1.5, 1.5]]).view(2, 4, 1, 1))
    l1 = _prepared(L1MutableChannelUnit, model, spec, choice_mode="number")
    l1.current_choice = 1
    l2 = _prepared(L2MutableChannelUnit, model, spec, choice_mode="number")
    l2.current_choice = 1
    assert l1.current_index.tolist() == [1]  # mean |w|: 1.0 vs 1.5
    assert l2.current_index.tolist() == [0]  # rms: 2.0 vs 1.5


def test_l1_normalizes_each_coupled_layer():
    """A large-scale layer mildly preferring channel 0 must not outvote a small one strongly preferring 5."""
    model = nn.ModuleDict({"big": nn.Conv2d(2, 6, 1), "small": nn.Conv2d(2, 6, 1), "next": nn.Conv2d(6, 2, 1)})
    with torch.no_grad():
        model["big"].weight.fill_(100.0)
        model["big"].weight[0] = 103.0
        model["small"].weight.fill_(0.01)
        model["small"].weight[5] = 0.1
    spec = UnitSpec(6, [out_ref("big", 0, 6), out_ref("small", 0, 6)], [in_ref("next", 0, 6)])
    unit = _prepared(L1MutableChannelUnit, model, spec, choice_mode="number")
    unit.current_choice = 1
    assert unit.current_index.tolist() == [5]


def test_importance_selection_is_balanced_per_group():
    model, _ = _conv_pair(8)
    spec = UnitSpec(8, [out_ref("0", 0, 8)], [in_ref("1", 0, 8)], groups=2)
    with torch.no_grad():
        model[0].weight.normal_(0, 0.01)
        model[0].weight[[1, 2, 3]] += 1.0  # all three in group 0
    unit = _prepared(L1MutableChannelUnit, model, spec, choice_mode="number")
    unit.current_choice = 4
    index = unit.current_index.tolist()
    assert len([i for i in index if i < 4]) == 2 and len([i for i in index if i >= 4]) == 2
    assert set(index[:2]) <= {1, 2, 3}


def test_bn_scale_keeps_largest_gamma():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)).eval()
    spec = UnitSpec(8, [out_ref("0", 0, 8), out_ref("1", 0, 8)], [in_ref("1", 0, 8), in_ref("2", 0, 8)])
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].weight[0] = 9.0  # the conv prefers channel 0; gamma must decide instead
        model[1].weight.copy_(torch.tensor([0.1, 0.2, -0.1, 3.0, 0.3, -5.0, 0.2, 0.1]))
    unit = _prepared(BNScaleMutableChannelUnit, model, spec, choice_mode="number")
    unit.current_choice = 2
    assert unit.current_index.tolist() == [3, 5]


def test_bn_scale_without_norm_falls_back_to_l1():
    model, spec = _conv_pair()
    with torch.no_grad():
        model[0].weight.normal_(0, 0.01)
        model[0].weight[[2, 6]] += 1.0
    unit = _prepared(BNScaleMutableChannelUnit, model, spec, choice_mode="number")
    unit.current_choice = 2
    assert unit.current_index.tolist() == [2, 6]


def test_taylor_accumulates_abs_of_summed_grad_times_weight():
    model, spec = _conv_pair()
    unit = _prepared(TaylorMutableChannelUnit, model, spec, choice_mode="number")
    unit.current_choice = 2
    assert unit.current_index.tolist() == [0, 1]  # nothing accumulated yet: first channels
    conv = model[0]
    with torch.no_grad():
        conv.weight.fill_(0.1)
        conv.weight[3] = -1.0          # sum(grad * w) over the row is -4: large once the absolute value is taken
        conv.weight[5, :2] = 2.0
        conv.weight[5, 2:] = -1.0      # +2: the row's terms partly cancel before the absolute value
        conv.weight[6, :2] = 3.0
        conv.weight[6, 2:] = -3.0      # 0: cancels exactly, although |w| is the largest
        conv.bias.zero_()
    conv.weight.grad = torch.ones_like(conv.weight)
    conv.bias.grad = torch.zeros_like(conv.bias)
    unit.update_importance()
    unit.update_importance()
    assert unit.num_updates == 2
    torch.testing.assert_close(unit.channel_importance()[[3, 5, 6]], torch.tensor([8.0, 4.0, 0.0]))
    unit.current_choice = 2
    assert unit.current_index.tolist() == [3, 5]
    unit.reset_importance()
    assert unit.num_updates == 0 and unit.channel_importance() is None


def test_taylor_from_a_real_backward_pass():
    model, spec = _conv_pair()
    unit = _prepared(TaylorMutableChannelUnit, model, spec, choice_mode="number")
    model.train()
    conv, expected = model[0], torch.zeros(8)
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(2, 4, 5, 5)).pow(2).sum().backward()
        unit.update_importance()
        with torch.no_grad():  # per channel: |sum over its weight row and bias of grad * param|
            step = (conv.weight.grad * conv.weight).flatten(1).sum(1) + conv.bias.grad * conv.bias
            expected += step.abs()
    assert unit.num_updates == 3
    torch.testing.assert_close(unit.channel_importance(), expected)
    unit.current_choice = 3
    assert torch.equal(unit.current_index, expected.topk(3).indices.sort().values)


# --------------------------------------------------------------------------------------- model and assembler
def test_prepare_converts_each_module_once(ops):
    model = SmallNet()
    units = [u for u in build_units() if u.is_mutable]
    units[0].prepare_for_pruning(model)
    conv1 = model.conv1
    assert isinstance(conv1, ops.DynamicChannelMixin)
    for unit in units[1:]:
        unit.prepare_for_pruning(model)
    assert model.conv1 is conv1  # shared with later units, not converted again
    dynamic = [n for n, m in model.named_modules() if isinstance(m, ops.DynamicChannelMixin)]
    assert sorted(dynamic) == sorted(["conv0", "bn0", "conv1", "bn1", "conv2", "bn2", "conv3", "dw", "bn_dw",
                                      "conv4", "gconv", "fc"])


def test_prepare_rejects_missing_or_unconvertible_modules_without_touching_the_model(ops):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PReLU(4), nn.Conv2d(4, 2, 1))
    missing = SequentialMutableChannelUnit.from_spec(UnitSpec(4, [out_ref("0", 0, 4)], [in_ref("7", 0, 4)]))
    with pytest.raises(ConfigError, match="'7'"):
        missing.prepare_for_pruning(model)
    odd = SequentialMutableChannelUnit.from_spec(UnitSpec(4, [out_ref("0", 0, 4), out_ref("1", 0, 4)],
                                                          [in_ref("2", 0, 4)]))
    with pytest.raises(ConfigError, match="PReLU"):
        odd.prepare_for_pruning(model)
    assert not any(isinstance(m, ops.DynamicChannelMixin) for m in model.modules())


def test_assembler_builds_concat_and_expanded_indices():
    model, units = prepared_small_net()
    names = list(units)
    unit_b, unit_c, unit_e = units[names[1]], units[names[2]], units[names[4]]
    assert model.conv4.in_index is None and model.fc.in_index is None  # all kept -> None
    unit_b.current_choice = 0.5   # 3 of 6
    unit_c.current_choice = 0.5   # 2 of 4
    assert model.conv4.in_index.tolist() == [0, 1, 2, 6, 7]
    assert model.dw.out_index.tolist() == [0, 1, 2, 6, 7]
    assert model.bn_dw.out_index.tolist() == [0, 1, 2, 6, 7]
    unit_e.current_choice = 0.25  # 2 of 8, one per group: channels 0 and 4
    assert unit_e.current_index.tolist() == [0, 4]
    assert model.fc.in_index.tolist() == [0, 1, 2, 3, 16, 17, 18, 19]
    assert model.gconv.out_index.tolist() == [0, 4]
    unit_b.current_choice = 1.0
    assert model.conv4.in_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_assembler_reapplies_only_layers_of_changed_units():
    model, units = prepared_small_net()
    counter = {}
    for name in ("conv2", "conv3", "conv4", "fc", "gconv"):
        module = getattr(model, name)
        for method in ("set_out_index", "set_in_index"):
            original = getattr(module, method)

            def counting(index, _original=original, _name=name):
                counter[_name] = counter.get(_name, 0) + 1
                return _original(index)
            setattr(module, method, counting)
    unit_e = units[list(units)[4]]
    unit_e.current_choice = 0.5
    assert set(counter) == {"gconv", "fc"}


def test_assembler_rejects_overlapping_ranges():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1))
    first = SequentialMutableChannelUnit.from_spec(UnitSpec(5, [out_ref("0", 0, 5)], [in_ref("1", 0, 5)]))
    second = SequentialMutableChannelUnit.from_spec(UnitSpec(4, [out_ref("0", 4, 8)], [in_ref("1", 4, 8)]))
    for unit in (first, second):
        unit.prepare_for_pruning(model)
    with pytest.raises(ConfigError, match="overlaps"):
        LayerIndexAssembler([first, second]).attach(model)


@pytest.mark.parametrize("unit_type", [SequentialMutableChannelUnit, L1MutableChannelUnit,
                                       BNScaleMutableChannelUnit])
def test_exported_small_net_equals_dynamic(unit_type, ops):
    model, units = prepared_small_net(unit_type)
    x = torch.randn(2, 3, 8, 8)
    for seed in range(3):
        torch.manual_seed(seed)
        for unit in units.values():
            unit.current_choice = unit.sample_choice()
        with torch.no_grad():
            dynamic_out = model(x)
            exported = export_model(_deepcopy(model), ops).eval()
            assert not any(isinstance(m, ops.DynamicChannelMixin) for m in exported.modules())
            torch.testing.assert_close(exported(x), dynamic_out, rtol=1e-5, atol=1e-5)
    kept = units[list(units)[1]].active_channels  # unit B: conv2's output width
    assert exported.conv2.out_channels == kept


def test_pruned_small_net_has_fewer_params_at_half_width(ops):
    model, units = prepared_small_net(L1MutableChannelUnit)
    full = sum(p.numel() for p in export_model(_deepcopy(model), ops).parameters())
    for unit in units.values():
        unit.current_choice = 0.5
    pruned = export_model(_deepcopy(model), ops)
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * full
    assert pruned(torch.randn(1, 3, 8, 8)).shape == (1, 5)


def _deepcopy(model):
    import copy
    return copy.deepcopy(model)


def test_is_mutable_needs_both_sides():
    only_in = SequentialMutableChannelUnit.from_spec(UnitSpec(3, [], [in_ref("conv0", 0, 3)]), **RATIO_MODE)
    assert not only_in.is_mutable and only_in.name == "conv0_(0, 3)_3"
    assert math.isclose(only_in.current_choice, 1.0)


def test_unit_adopts_the_group_constraint_of_a_grouped_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1, groups=2), nn.Conv2d(8, 8, 1, groups=8))
    unit = L1MutableChannelUnit.from_spec(UnitSpec(8, [out_ref("0", 0, 8), out_ref("2", 0, 8)],
                                                   [in_ref("1", 0, 8), in_ref("2", 0, 8)]))  # groups not given
    unit.prepare_for_pruning(model)
    assert unit.groups == 2  # from the grouped conv "1"; the depthwise "2" adds no constraint
    unit.current_choice = 0.25
    index = unit.current_index.tolist()
    assert len(index) == 2 and index[0] < 4 <= index[1]
    partial = SequentialMutableChannelUnit.from_spec(UnitSpec(4, [out_ref("0", 0, 4)], [in_ref("1", 0, 4)]))
    with pytest.raises(ConfigError, match="balanced per group"):
        partial.prepare_for_pruning(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1, groups=2)))


def test_prefix_unit_with_an_unchanged_count_touches_no_layer():
    model, units = prepared_small_net()
    unit = units["conv0_(0, 8)_8"]
    unit.current_choice = 0.5
    version, layer_version = unit.version, model.conv2.selection_version
    unit.current_choice = 0.5
    assert unit.version == version and model.conv2.selection_version == layer_version
    unit.current_choice = 0.25
    assert model.conv2.selection_version > layer_version


@pytest.mark.parametrize("unit_type", [SequentialMutableChannelUnit, L1MutableChannelUnit])
def test_apply_index_restores_an_exact_selection(unit_type):
    model, units = prepared_small_net(unit_type)
    unit = units["conv4_(0, 8)_8"]  # groups=2
    unit.apply_index(torch.tensor([1, 3, 4, 6]))
    assert unit.current_index.tolist() == [1, 3, 4, 6] and unit.current_choice == 0.5
    assert model.gconv.in_index.tolist() == [1, 3, 4, 6]
    unit.current_choice = 0.5  # choosing again goes back to the unit's own rule
    if unit_type is SequentialMutableChannelUnit:
        assert unit.current_index.tolist() == [0, 1, 4, 5]
    for bad in (torch.tensor([1, 2, 3]), torch.tensor([], dtype=torch.int64), torch.arange(9), torch.zeros(2, 2)):
        with pytest.raises(ChannelSelectionError, match=r"conv4_\(0, 8\)_8"):
            unit.apply_index(bad)


def test_taylor_importance_state_round_trip():
    model, spec = _conv_pair()
    unit = _prepared(TaylorMutableChannelUnit, model, spec)
    model(torch.randn(2, 4, 3, 3)).sum().backward()
    unit.update_importance()
    state = unit.importance_state_dict()
    other = _prepared(TaylorMutableChannelUnit, *_conv_pair())
    other.load_importance_state_dict(state)
    assert other.num_updates == 1 and torch.equal(other.channel_importance(), unit.channel_importance())
    with pytest.raises(ConfigError, match="shape"):
        other.load_importance_state_dict({"importance": torch.zeros(3), "num_updates": 1})
