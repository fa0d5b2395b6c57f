"""Config keys and spellings mmrazor writes or accepts: ``_scope_``, mutator ``init_cfg``, channel ``expand_ratio``,
its flatten -> Linear ranges, norms listed on both sides of a unit, and the entries it skips silently (pyprune
skips them too, with one warning, or raises when strict)."""
import copy
import warnings

import pytest
import torch

from compat.models import ExpandLineModel, SingleLineModel
from pyprune.compat.mmrazor import MODELS, ChannelMutator
from pyprune.errors import ConfigError
from pyprune.units.leniency import ConfigLeniencyWarning

SMALL = (1, 3, 16, 16)
MMRAZOR_PARSE_CFG = dict(_scope_="mmrazor", type="ChannelAnalyzer", demo_input=SMALL, tracer_type="BackwardTracer")


def prepared(model, **kwargs):
    mutator = ChannelMutator(parse_cfg=dict(MMRAZOR_PARSE_CFG), **kwargs)
    mutator.prepare_from_supernet(model)
    return mutator


def channel(name, start, end, is_output, **extra):
    return dict(name=name, start=start, end=end, is_output_channel=is_output, **extra)


def test_mmrazor_default_parse_cfg_with_scope_and_init_cfg():
    mutator = prepared(SingleLineModel(), init_cfg=dict(type="Pretrained", checkpoint="unused"))
    assert [u.name for u in mutator.mutable_units] == ["net.0_(0, 8)_8", "net.3_(0, 16)_16"]
    assert "_scope_" not in mutator.config_template()["parse_cfg"]
    again = ChannelMutator.from_config({**mutator.config_template(), "_scope_": "mmrazor", "init_cfg": None})
    assert again.parse_cfg["tracer_type"] == "BackwardTracer"
    from_cfg = ChannelMutator(dict(type="SequentialMutableChannelUnit", units={"net.0_(0, 8)_8": {"choice": 3}}),
                              parse_cfg=dict(MMRAZOR_PARSE_CFG, from_cfg=True))  # mmrazor: units from the config
    from_cfg.prepare_from_supernet(SingleLineModel())
    assert from_cfg.current_choices["net.0_(0, 8)_8"] == 3


def test_mmrazor_unit_config_with_expand_ratio_and_a_norm_on_both_sides():
    """mmrazor's own test config for SingleLineModel: its analyzer lists the BN as output *and* input."""
    config = {"init_args": {"num_channels": 8}, "choice": 4, "channels": {
        "input_related": [channel("net.1", 0, 8, False, expand_ratio=1), channel("net.3", 0, 8, False, expand_ratio=1)],
        "output_related": [channel("net.0", 0, 8, True, expand_ratio=1), channel("net.1", 0, 8, True, expand_ratio=1)]}}
    for parse_type in ("Config", "ChannelAnalyzer"):
        model = SingleLineModel()
        parse_cfg = dict(type="Config") if parse_type == "Config" else dict(MMRAZOR_PARSE_CFG)
        units = {"net.0_(0, 8)_8": config}
        if parse_type == "Config":  # a structure must cover the model: add the second unit as mmrazor writes it
            units["net.3_(0, 16)_16"] = {"init_args": {"num_channels": 16}, "channels": {
                "input_related": [channel("net.4", 0, 16, False), channel("linear", 0, 16, False)],
                "output_related": [channel("net.3", 0, 16, True), channel("net.4", 0, 16, True)]}}
        mutator = ChannelMutator(dict(type="SequentialMutableChannelUnit", units=units), parse_cfg)
        mutator.prepare_from_supernet(model)
        assert mutator.current_choices["net.0_(0, 8)_8"] == 4, parse_type
        assert mutator.export(model).net[3].in_channels == 4


def mmrazor_expand_structure(choice):
    """ExpandLineModel as mmrazor writes it: the Linear's range [0, 64) for a 16-channel unit, no expand key."""
    return {
        "net.0_(0, 8)_8": {"init_args": {"num_channels": 8}, "choice": 8, "channels": {
            "input_related": [channel("net.3", 0, 8, False)],
            "output_related": [channel("net.0", 0, 8, True), channel("net.1", 0, 8, True)]}},
        "net.3_(0, 16)_16": {"init_args": {"num_channels": 16}, "choice": choice, "channels": {
            "input_related": [channel("linear", 0, 64, False)],
            "output_related": [channel("net.3", 0, 16, True), channel("net.4", 0, 16, True)]}},
        "linear_(0, 1000)_1000": {"init_args": {"num_channels": 1000}, "choice": 1000, "channels": {
            "input_related": [], "output_related": [channel("linear", 0, 1000, True)]}},
    }


@pytest.mark.parametrize("parse_type", ["Config", "ChannelAnalyzer"])
def test_flatten_to_linear_range_written_mmrazor_style(parse_type):
    model = ExpandLineModel()
    parse_cfg = dict(type="Config") if parse_type == "Config" else dict(MMRAZOR_PARSE_CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is fixed or skipped on the way
        mutator = ChannelMutator(dict(type="SequentialMutableChannelUnit", units=mmrazor_expand_structure(6)),
                                 parse_cfg)
        mutator.prepare_from_supernet(model)
    unit = next(u for u in mutator.units if u.name == "net.3_(0, 16)_16")
    assert unit.is_mutable and unit.input_related[0].expand == 4 and unit.active_channels == 6
    small = mutator.export(model)
    assert small.linear.in_features == 24 and small.net[3].out_channels == 6
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(small.eval()(x), model.eval()(x))


def test_unknown_units_and_counts_above_the_width_warn_once_and_load():
    units = {"net.0_(0, 8)_8": {"choice": 693},               # more channels than the unit has
             "backbone.gone_(0, 4)_4": {"choice": 2},         # a unit this model does not have
             "linear_(0, 1000)_1000": {"choice": 10}}         # the logits: never pruned
    model = SingleLineModel()
    mutator = ChannelMutator(dict(type="SequentialMutableChannelUnit", units=copy.deepcopy(units)),
                             dict(MMRAZOR_PARSE_CFG))
    with pytest.warns(ConfigLeniencyWarning) as caught:
        mutator.prepare_from_supernet(model)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "backbone.gone_(0, 4)_4" in message and "net.0_(0, 8)_8 (693 > 8)" in message
    assert "linear_(0, 1000)_1000" in message and "strict=True" in message
    assert mutator.current_choices["net.0_(0, 8)_8"] == 8


def test_strict_refuses_what_mmrazor_would_skip_and_leaves_the_model_alone():
    model = SingleLineModel()
    mutator = ChannelMutator(dict(type="SequentialMutableChannelUnit", units={"backbone.gone_(0, 4)_4": {}}),
                             dict(MMRAZOR_PARSE_CFG), strict=True)
    with pytest.raises(ConfigError, match=r"backbone\.gone_\(0, 4\)_4.*strict=True"):
        mutator.prepare_from_supernet(model)
    assert not any(type(m).__module__.startswith("pyprune") for m in model.modules())


def test_mutator_config_round_trip_through_the_registry():
    """mmrazor's test_mix_config_tracer: a template with init args builds (MODELS.build) the same mutator."""
    model = SingleLineModel()
    first = prepared(copy.deepcopy(model))
    first.set_choices({"net.0_(0, 8)_8": 5})
    config = first.config_template(with_unit_init_args=True)
    second = MODELS.build(config)
    second.prepare_from_supernet(copy.deepcopy(model))
    assert second.config_template(with_unit_init_args=True) == config


def test_a_mutator_type_registered_under_another_name_loads():
    MODELS.register_module(name="CompatAliasChannelMutator", module=ChannelMutator, force=True)
    try:
        mutator = ChannelMutator.from_config(dict(type="CompatAliasChannelMutator",
                                                  parse_cfg=dict(MMRAZOR_PARSE_CFG)))
    finally:
        MODELS.remove_module("CompatAliasChannelMutator")
    assert type(mutator) is ChannelMutator and "CompatAliasChannelMutator" not in MODELS
    with pytest.raises(ConfigError, match="not a ChannelMutator"):
        ChannelMutator.from_config(dict(type="SequentialMutableChannelUnit"))
