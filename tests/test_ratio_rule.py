"""One ratio-to-count rule: every entry point that takes a kept ratio keeps the same number of channels.

The rule is :func:`pyprune.channels.ratio_to_count` (mmrazor's ``max(1, int(ratio * C))`` with a tolerance for float
noise, at most ``C``). Checked for every width 1..64 at ratios 0.1, 0.2, ..., 1.0 through a DynamicLinear's
``set_out_channels``, a SequentialMutableChannelUnit's ``current_choice`` (both choice modes), mmrazor's
``SquentialMutableChannel``, ``ChannelMutator.set_global_ratio`` and a one-float ``target_pruning_ratio`` (what
``pyprune prune --target-ratio`` builds) on a chain of Linear layers whose hidden widths are 1..64, and the budget
planner's uniform allocation.
"""
import pytest
from torch import nn

from pyprune.algorithms import ItePruneAlgorithm
from pyprune.budget.allocation import Ladder, count_at_ratio, reachable_counts
from pyprune.channels import ratio_to_count
from pyprune.errors import ChannelSelectionError
from pyprune.mutators import ChannelMutator
from pyprune.ops import DynamicLinear, to_dynamic
from pyprune.units import SequentialMutableChannelUnit, SquentialMutableChannel

WIDTHS = range(1, 65)
RATIOS = [k / 10 for k in range(1, 11)]  # 0.1, 0.2, ..., 1.0 as a user types them (0.30000000000000004 included)

# The table in docs/ARCHITECTURE.md ("Ratios become counts by one rule"): width -> kept count at 0.1, 0.25, 0.5, 0.75.
DOC_TABLE = {1: (1, 1, 1, 1), 3: (1, 1, 1, 2), 9: (1, 2, 4, 6), 10: (1, 2, 5, 7), 64: (6, 16, 32, 48)}


def expected(width: int, ratio: float) -> int:
    """The rule written out independently: truncation, a whole count when the product is within 1e-6 below it."""
    product = ratio * width
    nearest = round(product)
    whole = nearest if abs(product - nearest) <= 1e-6 else int(product)
    return min(width, max(1, whole))


class WidthChain(nn.Module):
    """Linear layers 2 -> 1 -> 2 -> ... -> 64 -> 2: one unit per hidden width 1..64."""

    def __init__(self):
        super().__init__()
        sizes = [2, *WIDTHS, 2]
        self.layers = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def chain():
    model = WidthChain()
    mutator = ChannelMutator(channel_unit_cfg=dict(type="SequentialMutableChannelUnit",
                                                   default_args=dict(choice_mode="number")),
                             parse_cfg=dict(type="ChannelAnalyzer", demo_input=(1, 2), tracer_type="auto"))
    mutator.prepare_from_supernet(model)
    units = {u.num_channels: u for u in mutator.mutable_units}
    assert sorted(units) == list(WIDTHS)  # one prunable unit per hidden width, none fixed
    return model, mutator, units


def test_the_rule_is_mmrazors_truncation_and_float_noise_never_costs_a_channel():
    assert ratio_to_count(0.5, 9) == 4 and ratio_to_count(0.7, 64) == 44   # int(4.5), int(44.8): mmrazor's
    assert ratio_to_count(0.57, 100) == 57                                  # 0.57 * 100 = 56.99999999999999
    assert all(ratio_to_count(k / width, width) == k for width in WIDTHS for k in range(1, width + 1))
    assert [ratio_to_count(r, w) for w in WIDTHS for r in RATIOS] == [expected(w, r) for w in WIDTHS for r in RATIOS]
    for width, counts in DOC_TABLE.items():
        assert tuple(ratio_to_count(r, width) for r in (0.1, 0.25, 0.5, 0.75)) == counts


@pytest.mark.parametrize("ratio, width", [(0.0, 4), (1.5, 4), (-0.1, 4), (float("nan"), 4), (True, 4), ("0.5", 4),
                                          (0.5, 0), (0.5, 2.0), (0.5, True)])
def test_the_rule_refuses_what_is_not_a_ratio_of_a_width(ratio, width):
    with pytest.raises(ValueError, match="ratio_to_count"):
        ratio_to_count(ratio, width)


def test_a_dynamic_linear_keeps_what_the_rule_names():
    for width in WIDTHS:
        layer = DynamicLinear(3, width)
        for ratio in RATIOS:
            layer.set_out_channels(ratio)
            assert layer.active_out_channels == ratio_to_count(ratio, width), (width, ratio)


@pytest.mark.parametrize("mode", ["number", "ratio"])
def test_a_unit_choice_keeps_what_the_rule_names(mode):
    for width in WIDTHS:
        unit = SequentialMutableChannelUnit(width, choice_mode=mode)
        for ratio in RATIOS:
            unit.current_choice = ratio
            assert unit.active_channels == ratio_to_count(ratio, width), (width, ratio, mode)
            assert unit.choice_to_count(unit.choice_from_ratio(ratio)) == unit.active_channels


def test_mmrazors_mutable_channel_keeps_what_the_rule_names():
    for width in WIDTHS:
        mutable = SquentialMutableChannel(width)
        for ratio in RATIOS:
            mutable.current_choice = ratio
            assert int(mutable.current_mask.sum()) == ratio_to_count(ratio, width), (width, ratio)


def test_set_global_ratio_keeps_what_the_rule_names(chain):
    model, mutator, units = chain
    for ratio in RATIOS:
        mutator.set_global_ratio(ratio)
        assert {w: u.active_channels for w, u in units.items()} == {w: ratio_to_count(ratio, w) for w in WIDTHS}
        hidden = model.layers[:-1]  # layer i produces the unit of width i + 1
        assert [layer.active_out_channels for layer in hidden] == [ratio_to_count(ratio, w) for w in WIDTHS]
    mutator.set_global_ratio(1.0)


def test_a_one_float_target_keeps_what_the_rule_names(chain):
    """``pyprune prune --target-ratio R`` builds ``ItePruneAlgorithm(model, mutator, R)`` on ratio-mode units."""
    model, mutator, units = chain
    for ratio in RATIOS:
        algorithm = ItePruneAlgorithm(model, mutator, ratio)
        final = algorithm.choices_at(algorithm.prune_times)
        assert {w: u.choice_to_count(final[u.name]) for w, u in units.items()} == \
            {w: ratio_to_count(ratio, w) for w in WIDTHS}
    ratio_units = [SequentialMutableChannelUnit(w, choice_mode="ratio") for w in WIDTHS]
    for ratio in RATIOS:  # the CLI's units are in ratio mode: the choice is count / width, which maps back exactly
        assert [u.choice_to_count(u.choice_from_ratio(ratio)) for u in ratio_units] == \
            [ratio_to_count(ratio, u.num_channels) for u in ratio_units]


def test_uniform_budget_allocation_keeps_what_the_rule_names():
    for width in WIDTHS:
        unit = SequentialMutableChannelUnit(width)
        ladder = Ladder(0, unit, reachable_counts(unit))
        assert ladder.counts == list(range(1, width + 1))
        assert [count_at_ratio(ladder, r) for r in RATIOS] == [ratio_to_count(r, width) for r in RATIOS], width


def test_a_unit_divisor_rounds_after_the_rule():
    """``divisor`` / ``min_ratio`` (make_divisible) is a second step on the count the rule names: 0.5 of 20 names 10,
    the nearest multiple of 8 is 8, which is below 0.9 * 10, so 16."""
    unit = SequentialMutableChannelUnit(20, divisor=8)
    unit.current_choice = 0.5
    assert unit.active_channels == 16
    assert unit.choice_to_count(unit.choice_from_ratio(0.5)) == 16


def test_a_grouped_layer_refuses_a_ratio_whose_count_does_not_split_over_its_groups():
    conv = to_dynamic(nn.Conv2d(8, 8, 3, groups=4))
    conv.set_out_channels(0.5)                              # names 4 of 8: one per group
    assert conv.active_out_channels == 4
    with pytest.raises(ChannelSelectionError, match="keeps 3 channels, which cannot be split evenly"):
        conv.set_out_channels(0.4)                          # names 3 of 8 (int(3.2)): not a multiple of 4 groups
    assert conv.active_out_channels == 4


def test_a_bad_ratio_names_the_unit_and_changes_nothing():
    unit = SequentialMutableChannelUnit(10, name="conv1_(0, 10)_10")
    unit.current_choice = 0.5
    with pytest.raises(ChannelSelectionError, match=r"unit conv1_\(0, 10\)_10: a kept ratio must be"):
        unit.choice_from_ratio(1.5)
    assert unit.active_channels == 5
    mutable = SquentialMutableChannel(10)
    mutable.current_choice = 0.5
    with pytest.raises(ChannelSelectionError, match="SquentialMutableChannel: a choice must be"):
        mutable.current_choice = 1.5
    assert int(mutable.current_mask.sum()) == 5
