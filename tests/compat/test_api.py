"""mmrazor API that pyprune offers under the same names: ChannelAnalyzer, ChannelUnit and the unit constructors,
fix_chosen, mutable channels / values, DefaultDemoInput, models predefined with dynamic ops (parse type
'Predefined'), a user's unit registered by name."""
import functools
import warnings

import pytest
import torch
from torch import nn

from compat.models import SingleLineModel
from pyprune.compat.mmrazor import (MODELS, ChannelAnalyzer, ChannelMutator, ChannelUnit, DefaultDemoInput,
                                    DynamicBatchNorm2d, DynamicConv2d, DynamicLinear, L1MutableChannelUnit,
                                    MutableValue, OneShotMutableChannel, OneShotMutableChannelUnit,
                                    OneShotMutableValue, SequentialMutableChannelUnit, SimpleMutableChannel,
                                    SquentialMutableChannel)
from pyprune.errors import ChannelSelectionError, ConfigError

SMALL = (1, 3, 16, 16)


def run_units(units, model, size=16):
    """mmrazor's _test_units: prepare each unit, set a sampled choice on the mutable ones, run the model."""
    for unit in units:
        unit.prepare_for_pruning(model)
    mutable = [unit for unit in units if unit.is_mutable]
    assert mutable
    for unit in mutable:
        choice = unit.sample_choice()
        unit.current_choice = choice
        assert abs(unit.current_choice - choice) < 0.1
    assert model(torch.rand(2, 3, size, size)).shape == (2, 1000)
    return mutable



def test_channel_analyzer_refuses_a_trace_fn_partial_with_its_own_tracer():
    # ChannelAnalyzer always passes tracer= from tracer_type, which would silently override the partial's.
    from pyprune.tracing import trace_channel_units
    with pytest.raises(ConfigError, match="ChannelAnalyzer: trace_fn is a functools.partial with tracer="):
        ChannelAnalyzer(demo_input=SMALL, trace_fn=functools.partial(trace_channel_units, tracer="fx"))
    with pytest.raises(ConfigError, match="ChannelAnalyzer: trace_fn must be callable"):
        ChannelAnalyzer(demo_input=SMALL, trace_fn=42)

def test_analyzer_returns_unit_configs():
    configs = ChannelAnalyzer(demo_input=SMALL, tracer_type="FxTracer").analyze(SingleLineModel())
    assert configs["net.0_(0, 8)_8"] == {"init_args": {"num_channels": 8}, "channels": {
        "input_related": [{"name": "net.3", "start": 0, "end": 8, "is_output_channel": False}],
        "output_related": [{"name": "net.0", "start": 0, "end": 8, "is_output_channel": True},
                           {"name": "net.1", "start": 0, "end": 8, "is_output_channel": True}]}}
    assert configs["linear_(0, 1000)_1000"]["channels"]["fixed"] == "model output"


@pytest.mark.parametrize("unit_class", [L1MutableChannelUnit, SequentialMutableChannelUnit])
def test_units_from_the_analyzer_and_from_channel_units(unit_class):
    analyzer = dict(type="ChannelAnalyzer", demo_input=SMALL)
    model = SingleLineModel()
    plain = ChannelUnit.init_from_channel_analyzer(model, analyzer=analyzer)
    assert {type(u) for u in plain} == {ChannelUnit} and "net.3_(0, 16)_16" in {u.name for u in plain}
    mutable = run_units([unit_class.init_from_channel_unit(u) for u in plain], model)
    assert {u.name for u in mutable} == {"net.0_(0, 8)_8", "net.3_(0, 16)_16"}
    model = SingleLineModel()
    run_units(unit_class.init_from_channel_analyzer(model, ChannelAnalyzer(demo_input=SMALL)), model)


def test_init_from_cfg_applies_the_choice_and_round_trips_init_args():
    unit = SequentialMutableChannelUnit(48, choice_mode="ratio", divisor=8)
    config = unit.config_template(with_init_args=True)
    again = SequentialMutableChannelUnit.init_from_cfg(None, config)
    assert again.config_template(with_init_args=True)["init_args"] == config["init_args"]
    model = SingleLineModel()
    config = {"init_args": {"num_channels": 8}, "choice": 3, "channels": {
        "input_related": [{"name": "net.3", "start": 0, "end": 8, "is_output_channel": False}],
        "output_related": [{"name": "net.0", "start": 0, "end": 8, "is_output_channel": True},
                           {"name": "net.1", "start": 0, "end": 8, "is_output_channel": True}]}}
    unit = SequentialMutableChannelUnit.init_from_cfg(model, config)
    assert unit.name == "net.0_(0, 8)_8" and unit.current_choice == 3
    unit.prepare_for_pruning(model)
    assert model.net[3].active_in_channels == 3


def test_fix_chosen_freezes_the_width():
    model = SingleLineModel()
    mutator = ChannelMutator(parse_cfg=dict(demo_input=SMALL))
    mutator.prepare_from_supernet(model)
    unit = mutator.mutable_units[0]
    unit.fix_chosen(5)
    assert unit.current_choice == 5 and unit.is_chosen_fixed
    unit.current_choice = 5
    with pytest.raises(ChannelSelectionError, match="fix_chosen"):
        unit.current_choice = 4
    mutator.fix_channel_mutables()
    assert all(u.is_chosen_fixed for u in mutator.units)


def test_mutable_channels_and_values():
    simple = SimpleMutableChannel(4)
    simple.current_choice = torch.tensor([True, False, True, False])
    assert simple.activated_channels == 2
    sequential = SquentialMutableChannel(8)
    sequential.current_choice = 0.5
    assert sequential.current_choice == 4 and sequential.current_mask.tolist() == [True] * 4 + [False] * 4
    assert sequential.expand_mutable_channel(2).current_mask.tolist() == [True] * 8 + [False] * 8
    sequential.fix_chosen(6)
    with pytest.raises(AttributeError):
        sequential.fix_chosen(6)
    one_shot = OneShotMutableChannel(8, [4, 8])
    with pytest.raises(ChannelSelectionError, match="candidates"):
        one_shot.current_choice = 5
    value = OneShotMutableValue(value_list=[6, 4, 2])
    assert value.current_choice == 6 and value.choices == [2, 4, 6] and value.sample_choice() in (2, 4, 6)
    assert (value.max_choice, value.min_choice) == (6, 2)
    assert OneShotMutableValue([6, 4, 2], default_value=4).current_choice == 4
    plain = MutableValue([2, 3, 4])
    assert plain.current_choice == 2 and plain.dump_chosen().meta == {"all_choices": [2, 3, 4]}
    with pytest.raises(ValueError):
        MutableValue([2, 4], default_value=5)
    with pytest.raises(TypeError):
        MutableValue([2, 3.2])
    plain.fix_chosen(3)
    with pytest.raises(RuntimeError):
        plain.fix_chosen(3)


def test_default_demo_input():
    maker = DefaultDemoInput(input_shape=[1, 3, 16, 16])
    model = SingleLineModel().eval()
    assert model(maker(model)).shape == (1, 1000) and maker.get_data(model).shape == (1, 3, 16, 16)
    assert DefaultDemoInput().input_shape == (1, 3, 224, 224)
    mutator = ChannelMutator(parse_cfg=dict(type="ChannelAnalyzer",
                                            demo_input=dict(type="DefaultDemoInput", input_shape=[1, 3, 16, 16])))
    mutator.prepare_from_supernet(model)
    assert mutator.config_template()["parse_cfg"]["demo_input"] == [1, 3, 16, 16]
    mutator = ChannelMutator(parse_cfg=ChannelAnalyzer(demo_input=SMALL))  # an analyzer object as parse_cfg
    mutator.prepare_from_supernet(SingleLineModel())
    assert len(mutator.mutable_units) == 2


class DynamicLinearModel(nn.Module):
    """mmrazor's DynamicLinearModel: built from dynamic ops, each side driven by a registered mutable."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(DynamicConv2d(3, 8, 3, 1, 1), DynamicBatchNorm2d(8), nn.ReLU(),
                                 DynamicConv2d(8, 16, 3, 1, 1), DynamicBatchNorm2d(16), nn.AdaptiveAvgPool2d(1))
        self.linear = DynamicLinear(16, 1000)
        self.mutable1 = OneShotMutableChannel(8, candidate_choices=[1, 4, 8])
        self.mutable2 = OneShotMutableChannel(16, candidate_choices=[2, 8, 16])
        self.net[0].register_mutable_attr("out_channels", self.mutable1)
        self.net[1].register_mutable_attr("num_features", self.mutable1.expand_mutable_channel(1))
        self.net[3].register_mutable_attr("in_channels", self.mutable1)
        self.net[3].register_mutable_attr("out_channels", self.mutable2)
        self.net[4].register_mutable_attr("num_features", self.mutable2)
        self.linear.register_mutable_attr("in_features", self.mutable2)

    def forward(self, x):
        x = self.net(x)
        return self.linear(x.reshape([x.shape[0], -1]))


def test_predefined_model_one_unit_per_mutable():
    model = DynamicLinearModel()
    mutator = ChannelMutator(dict(type="OneShotMutableChannelUnit", default_args=dict(unit_predefined=False)),
                             parse_cfg=dict(type="Predefined"))
    mutator.prepare_from_supernet(model)
    units = mutator.mutable_units
    assert [u.candidate_choices for u in units] == [[1, 4, 8], [2, 8, 16]]
    assert [u.choice_mode for u in units] == ["number", "number"]
    mutator.set_choices({units[0].name: 4, units[1].name: 8})
    assert model.mutable1.current_choice == 4 and model.mutable2.current_choice == 8  # the mutables follow
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 1000)
    small = mutator.export(model)
    assert (small.net[0].out_channels, small.net[3].out_channels, small.linear.in_features) == (4, 8, 8)


def test_predefined_without_mutables_and_bad_registrations_are_refused():
    with pytest.raises(ConfigError, match="Predefined"):
        ChannelMutator(parse_cfg=dict(type="Predefined")).prepare_from_supernet(SingleLineModel())
    conv = DynamicConv2d(3, 8, 3)
    with pytest.raises(ConfigError, match="span the layer's 3 channels"):
        conv.register_mutable_attr("in_channels", SquentialMutableChannel(8))
    with pytest.raises(ConfigError, match="kernel_size"):
        conv.register_mutable_attr("kernel_size", SquentialMutableChannel(8))


@MODELS.register_module()
class RandomChannelUnit(SequentialMutableChannelUnit):
    """mmrazor's test unit, registered by name: keeps randomly chosen channels."""

    def _select(self, count):
        return torch.randperm(self.num_channels)[:count].sort().values


def test_a_users_unit_registered_by_name_is_used_by_configs():
    model = SingleLineModel()
    mutator = ChannelMutator(channel_unit_cfg=dict(type="RandomChannelUnit"), parse_cfg=dict(demo_input=SMALL))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mutator.prepare_from_supernet(model)
    assert {type(u) for u in mutator.units} == {RandomChannelUnit}
    mutator.set_choices({"net.0_(0, 8)_8": 3})
    assert mutator.mutable_units[0].current_index.numel() == 3
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 1000)
