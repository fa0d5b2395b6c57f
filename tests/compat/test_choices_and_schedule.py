"""mmrazor's unit defaults and signatures, how a choice becomes a channel count, and ItePruneAlgorithm's schedule
(mmrazor's test_sequential_mutable_channel_unit / test_one_shot_mutable_channel_unit / test_prune_algorithm)."""
import warnings

import pytest
import torch

from compat.models import SingleLineModel
from pyprune.compat.mmrazor import (ChannelMutator, ItePruneAlgorithm, ItePruneConfigManager,
                                    OneShotMutableChannelUnit, SequentialMutableChannelUnit, SlimmableChannelUnit)
from pyprune.errors import ChannelSelectionError, ConfigError
from pyprune.units.leniency import ConfigLeniencyWarning

STREAM = "net.0_(0, 8)_8"   # SingleLineModel: conv 3->8 / bn / conv 8->16
NUMBER_MUTATOR = dict(type="ChannelMutator", channel_unit_cfg=dict(type="SequentialMutableChannelUnit"),
                      parse_cfg=dict(type="ChannelAnalyzer", demo_input=(1, 3, 16, 16), tracer_type="FxTracer"))


# ------------------------------------------------------------------------------------------------------- units
def test_sequential_unit_defaults_to_number_mode_and_takes_counts_and_ratios():
    unit = SequentialMutableChannelUnit(48)
    assert (unit.choice_mode, unit.divisor, unit.min_value, unit.min_ratio) == ("number", 1, 1, 0.9)
    unit.current_choice = 24
    assert unit.current_choice == 24
    unit.current_choice = 0.5          # a float is a ratio, turned into a count
    assert unit.current_choice == 24


def test_ratio_mode_reports_ratios():
    unit = SequentialMutableChannelUnit(48, choice_mode="ratio")
    unit.current_choice = 0.5
    assert unit.current_choice == 0.5


@pytest.mark.parametrize("mode", ["number", "ratio"])
def test_a_float_choice_truncates_like_mmrazor(mode):
    unit = SequentialMutableChannelUnit(64, choice_mode=mode)
    unit.current_choice = 0.7          # int(64 * 0.7) = int(44.8) = 44
    assert unit.active_channels == 44
    unit.current_choice = 29 / 96 if mode == "ratio" else 0.3
    assert unit.active_channels == 19  # int(19.2); a ratio k / C always gives k back


def test_divisor_rounds_counts_and_ratios():
    unit = SequentialMutableChannelUnit(48, choice_mode="number", divisor=8)
    unit.current_choice = 20
    assert unit.current_choice == 24
    assert all(unit.sample_choice() % 8 == 0 for _ in range(20))
    unit = SequentialMutableChannelUnit(48, choice_mode="ratio", divisor=8)
    unit.current_choice = 0.3
    assert unit.current_choice == 1 / 3


def test_one_shot_takes_candidates_second_and_rounds_them():
    unit = OneShotMutableChannelUnit(48, [20, 30, 40], choice_mode="number", divisor=8)
    assert unit.candidate_choices == [24, 32, 40] and unit.current_choice == 40
    unit = OneShotMutableChannelUnit(48, [0.3, 0.5, 0.7], choice_mode="ratio", divisor=8)
    assert unit.candidate_choices == [1 / 3, 0.5, 2 / 3]
    default = OneShotMutableChannelUnit(48)
    assert (default.choice_mode, default.candidate_choices, default.min_ratio) == ("ratio", [0.5, 1.0], 0.9)
    assert {default.sample_choice() for _ in range(30)} == {0.5, 1.0}


def test_slimmable_defaults_to_the_full_width_only():
    unit = SlimmableChannelUnit(16)
    assert unit.choice_mode == "number" and unit.candidate_choices == [16]
    with pytest.raises(ChannelSelectionError, match="candidate"):
        unit.current_choice = 8


def test_choice_template_of_a_default_mutator_gives_counts():
    model = SingleLineModel()
    mutator = ChannelMutator(parse_cfg=dict(demo_input=(1, 3, 16, 16)))
    mutator.prepare_from_supernet(model)
    assert mutator.choice_template == {STREAM: 8, "net.3_(0, 16)_16": 16}
    mutator.set_choices({STREAM: 0.5, "net.3_(0, 16)_16": 7})
    assert mutator.current_choices == {STREAM: 4, "net.3_(0, 16)_16": 7}
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 1000)


# ----------------------------------------------------------------------------------------------------- schedule
def test_config_manager_schedule_matches_mmrazor():
    for origin, target in [(1.0, 0.5), (10, 5)]:
        manager = ItePruneConfigManager({"a": target}, {"a": origin}, step_freq=20, prune_times=5)
        pruned = [i for i in range(100) if manager.is_prune_time(i)]
        assert pruned == [0, 20, 40, 60, 80]
        assert [manager.prune_at(i)["a"] for i in pruned] == pytest.approx(
            [origin - (origin - target) * t / 5 for t in range(1, 6)])


def test_number_mode_schedule_truncates():
    manager = ItePruneConfigManager({"a": 5}, {"a": 10}, step_freq=1, prune_times=3)
    assert [manager.prune_at(i)["a"] for i in range(3)] == [8, 6, 5]


def test_algorithm_from_config_dicts():
    algorithm = ItePruneAlgorithm(dict(type="SingleLineModel"), mutator_cfg=NUMBER_MUTATOR,
                                  target_pruning_ratio={STREAM: 5}, step_freq=1, prune_times=3)
    assert isinstance(algorithm.architecture, SingleLineModel) and algorithm.mutator.units
    seen = []
    while not algorithm.done:
        algorithm.step()
        seen.append(algorithm.mutator.current_choices[STREAM])
    assert seen == [7, 6, 5]  # 8 -> 5 in thirds: 7.0, 6.0, 5, truncated
    assert algorithm.export()(torch.randn(1, 3, 16, 16)).shape == (1, 1000)


def test_target_none_keeps_the_structure():
    algorithm = ItePruneAlgorithm(SingleLineModel(), NUMBER_MUTATOR, step_freq=1, prune_times=2)
    before = dict(algorithm.mutator.current_choices)
    algorithm.mutator.set_choices({STREAM: 3})
    algorithm = ItePruneAlgorithm(algorithm.model, algorithm.mutator, None, step_freq=1, prune_times=2)
    for _ in range(3):
        algorithm.step()
    assert algorithm.done and algorithm.mutator.current_choices == {**before, STREAM: 3}


def test_default_mutator_is_mmrazors():
    algorithm = ItePruneAlgorithm(SingleLineModel(), dict(type="ChannelMutator",
                                                         parse_cfg=dict(demo_input=(1, 3, 16, 16))))
    assert type(algorithm.mutator.units[0]) is SequentialMutableChannelUnit
    assert algorithm.mutator.units[0].choice_mode == "number"


def test_epoch_based_loop_counts_step_freq_in_epochs():
    iters_per_epoch, epochs = 10, 10
    algorithm = ItePruneAlgorithm(SingleLineModel(), NUMBER_MUTATOR, target_pruning_ratio={STREAM: 2}, step_freq=2,
                                  prune_times=3, by_epoch=True, iters_per_epoch=iters_per_epoch)
    pruned_at = []
    for epoch in range(epochs):
        for iteration in range(iters_per_epoch):
            if algorithm.step():
                pruned_at.append((epoch, iteration, algorithm.mutator.current_choices[STREAM]))
        assert not algorithm.epoch_end()  # iterations are counted: epoch_end does not count twice
    assert pruned_at == [(0, 0, 6), (2, 0, 4), (4, 0, 2)]
    with pytest.raises(ConfigError, match="iters_per_epoch"):
        ItePruneAlgorithm(SingleLineModel(), NUMBER_MUTATOR, step_freq=2, iters_per_epoch=10)


def test_unknown_and_out_of_range_targets_warn_once_or_raise_when_strict():
    target = {STREAM: 99, "backbone.no_such_conv_(0, 8)_8": 0.5, "linear_(0, 1000)_1000": 0.5}
    with pytest.warns(ConfigLeniencyWarning) as caught:
        algorithm = ItePruneAlgorithm(SingleLineModel(), NUMBER_MUTATOR, target, step_freq=1)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "no_such_conv" in message and "linear_(0, 1000)_1000" in message and f"{STREAM} (99 > 8)" in message
    assert algorithm.target == {STREAM: 8}
    with pytest.raises(ConfigError, match="unknown unit names.*no_such_conv"):
        ItePruneAlgorithm(SingleLineModel(), NUMBER_MUTATOR, target, step_freq=1, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean target warns nothing
        ItePruneAlgorithm(SingleLineModel(), NUMBER_MUTATOR, {STREAM: 4}, step_freq=1)


def test_data_preprocessor_and_init_cfg_are_accepted_and_named():
    with pytest.warns(UserWarning, match="data_preprocessor, init_cfg ignored"):
        algorithm = ItePruneAlgorithm(SingleLineModel(), NUMBER_MUTATOR, data_preprocessor=dict(type="X"),
                                      init_cfg=dict(type="Pretrained"))
    assert algorithm.data_preprocessor == dict(type="X")
