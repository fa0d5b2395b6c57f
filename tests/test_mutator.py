"""ChannelMutator: preparing, choices, configs, export and summary.

On :class:`SmallNet` (tests/models.py) with its hand-written UnitSpecs in place of the tracer (so unit names are
pinned), and on torchvision models through the real tracer.
"""
import copy
import functools
import json

import pytest
import torch

from models import SmallNet, in_ref, small_net_specs
from pyprune.errors import ChannelSelectionError, ConfigError
from pyprune.mutators import ChannelMutator
from pyprune.ops import DynamicChannelMixin
from pyprune.tracing import trace_channel_units


def _hand_written_trace(real_trace):
    """SmallNet -> its hand-written specs (so these tests pin unit names); other models -> the real tracer."""
    def trace(model, example_inputs, *, fixed=(), strict=False, tracer="auto"):
        if isinstance(model, SmallNet):
            assert tracer in ("fx", "torch_function", "auto") and example_inputs.shape[1] == 3
            return small_net_specs()
        return real_trace(model, example_inputs, fixed=fixed, strict=strict, tracer=tracer)
    return trace


HAND = _hand_written_trace(trace_channel_units)  # the mutators' trace_fn in these tests


def _has_dynamic(model):
    return any(isinstance(m, DynamicChannelMixin) for m in model.modules())


def make_mutator(unit_type="SequentialMutableChannelUnit", trace_fn=HAND, **kwargs):
    return ChannelMutator(channel_unit_cfg=dict(type=unit_type, default_args=dict(choice_mode="ratio")),
                          parse_cfg=dict(type="ChannelAnalyzer", demo_input=(1, 3, 8, 8), tracer_type="auto"),
                          trace_fn=trace_fn, **kwargs)


def prepared(unit_type="SequentialMutableChannelUnit", **kwargs):
    model = SmallNet().eval()
    mutator = make_mutator(unit_type, **kwargs)
    mutator.prepare_from_supernet(model)
    return model, mutator


def _selections(model):
    return {name: (m.out_index, m.in_index) for name, m in model.named_modules() if isinstance(m, DynamicChannelMixin)}


def _same_selections(a, b):
    def same(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
    return a.keys() == b.keys() and all(same(a[k][0], b[k][0]) and same(a[k][1], b[k][1]) for k in a)


# ----------------------------------------------------------------------------------------------------- prepare
def test_prepare_builds_units_and_names_dynamic_ops():
    model, mutator = prepared()
    assert len(mutator.units) == 7 and len(mutator.mutable_units) == 5
    assert "conv0_(0, 8)_8" in mutator.current_choices
    assert set(mutator.current_choices.values()) == {1.0}
    for name, module in model.named_modules():
        if isinstance(module, DynamicChannelMixin):
            assert module.pyprune_name == name
    assert not _has_dynamic(mutator.export(model))
    with pytest.raises(ConfigError, match="already prepared"):
        mutator.prepare_from_supernet(model)


def test_unprepared_mutator_refuses_choices():
    with pytest.raises(ConfigError, match="prepare_from_supernet"):
        make_mutator().set_choices({})


@pytest.mark.parametrize("unit_type", ["SequentialMutableChannelUnit", "L1MutableChannelUnit",
                                       "L2MutableChannelUnit", "BNScaleMutableChannelUnit",
                                       "OneShotMutableChannelUnit"])
def test_global_ratio_export_equals_dynamic_and_is_smaller(unit_type):
    model, mutator = prepared(unit_type)
    x = torch.randn(2, 3, 8, 8)
    full_params = sum(p.numel() for p in mutator.export(model).parameters())
    mutator.set_global_ratio(0.5)
    assert all(abs(c - 0.5) <= 0.25 for c in mutator.current_choices.values())
    exported = mutator.export(model)
    assert not _has_dynamic(exported) and _has_dynamic(model)  # export leaves the dynamic model as it was
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in exported.parameters()) < 0.6 * full_params


def test_sampled_subnets_export_equal_dynamic():
    model, mutator = prepared("L1MutableChannelUnit")
    x = torch.randn(2, 3, 8, 8)
    for _ in range(4):
        choices = mutator.sample_choices()
        assert set(choices) == set(mutator.current_choices)
        mutator.set_choices(choices)
        assert mutator.current_choices == choices
        with torch.no_grad():
            torch.testing.assert_close(mutator.export(model)(x), model(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- set_choices
@pytest.mark.parametrize("bad", [float("nan"), 1.5, 0.0, "half", None])
def test_set_choices_is_all_or_nothing(bad):
    model, mutator = prepared()
    mutator.set_global_ratio(0.75)
    before_choices, before_selections = mutator.current_choices, _selections(model)
    names = list(before_choices)
    with pytest.raises(ChannelSelectionError, match=names[3].replace("(", r"\(").replace(")", r"\)")):
        mutator.set_choices({names[0]: 0.25, names[1]: 0.5, names[3]: bad})
    assert mutator.current_choices == before_choices
    assert _same_selections(_selections(model), before_selections)


def test_set_choices_unknown_names_and_bad_types():
    model, mutator = prepared()
    before = _selections(model)
    with pytest.raises(ConfigError, match=r"no_such_unit.*other"):
        mutator.set_choices({"no_such_unit": 0.5, "conv0_(0, 8)_8": 0.5, "other": 1.0})
    with pytest.raises(ConfigError, match="dict"):
        mutator.set_choices([0.5, 0.5])
    with pytest.raises(ChannelSelectionError, match="model output"):
        mutator.set_choices({"fc_(0, 5)_5": 0.5})
    mutator.set_choices({"fc_(0, 5)_5": 1.0})  # the full width of a fixed unit is fine
    assert _same_selections(_selections(model), before)


@pytest.mark.parametrize("bad", [0.0, 1.01, float("nan"), "0.5", True])
def test_set_global_ratio_rejects_bad_ratios(bad):
    _, mutator = prepared()
    with pytest.raises(ChannelSelectionError, match="ratio"):
        mutator.set_global_ratio(bad)


# ------------------------------------------------------------------------------------------------------ configs
def test_config_template_round_trip_through_json(tmp_path):
    model, mutator = prepared("L1MutableChannelUnit")
    torch.manual_seed(3)
    mutator.set_choices(mutator.sample_choices())
    config = mutator.config_template(only_mutable_units=True, with_unit_init_args=True, with_channels=True)
    path = tmp_path / "structure.json"
    path.write_text(json.dumps(config))
    assert config["channel_unit_cfg"]["type"] == "L1MutableChannelUnit"
    assert config["parse_cfg"] == {"type": "ChannelAnalyzer", "demo_input": [1, 3, 8, 8], "tracer_type": "auto"}

    loaded = ChannelMutator.from_config(json.loads(path.read_text()), trace_fn=HAND)
    new_model = SmallNet().eval()
    new_model.load_state_dict(SmallNet().state_dict())  # different weights: only the structure travels
    loaded.prepare_from_supernet(new_model)
    assert loaded.current_choices == mutator.current_choices
    shapes = {n: tuple(p.shape) for n, p in mutator.export(model).named_parameters()}
    assert {n: tuple(p.shape) for n, p in loaded.export(new_model).named_parameters()} == shapes


def test_config_from_channels_needs_no_tracer():
    model, mutator = prepared()
    mutator.set_global_ratio(0.5)
    config = mutator.config_template(with_unit_init_args=True, with_channels=True)
    config["parse_cfg"] = {"type": "Config"}
    loaded = ChannelMutator.from_config(config, trace_fn=lambda *a, **k: pytest.fail("must not trace"))
    new_model = SmallNet().eval()
    loaded.prepare_from_supernet(new_model)
    assert loaded.current_choices == mutator.current_choices
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.export(new_model)(x), new_model(x), rtol=1e-5, atol=1e-5)
    grouped = [u for u in loaded.units if u.groups == 2]
    assert len(grouped) == 2


def test_mmrazor_style_config_loads():
    config = {"type": "ChannelMutator",
              "channel_unit_cfg": {"type": "L1MutableChannelUnit", "default_args": {"choice_mode": "ratio"},
                                   "units": {"conv0_(0, 8)_8": {"init_args": {
                                       "num_channels": 8, "choice_mode": "ratio", "divisor": 1, "min_value": 1,
                                       "min_ratio": 0.9}, "choice": 0.625}}},
              "parse_cfg": {"type": "ChannelAnalyzer", "demo_input": [1, 3, 8, 8], "tracer_type": "BackwardTracer"}}
    mutator = ChannelMutator.from_config(config, trace_fn=HAND)
    model = SmallNet().eval()
    mutator.prepare_from_supernet(model)
    unit = mutator._by_name["conv0_(0, 8)_8"]
    assert unit.min_ratio == 0.9 and unit.active_channels == 5
    assert model.conv1.out_index.numel() == 5 and model.conv2.in_index.numel() == 5


def test_config_mismatch_lists_names_and_leaves_model_unchanged():
    config = make_mutator().config_template()
    config["channel_unit_cfg"]["units"] = {"conv0_(0, 8)_8": {"choice": 0.5},
                                           "ghost_(0, 4)_4": {"choice": 0.5},
                                           "conv4_(0, 8)_8": {"init_args": {"num_channels": 16}}}
    model = SmallNet()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"(?s)ghost_\(0, 4\)_4.*|num_channels=16") as info:
        ChannelMutator.from_config(config, trace_fn=HAND).prepare_from_supernet(model)
    assert "ghost_(0, 4)_4" in str(info.value) and "num_channels=16" in str(info.value)
    assert not _has_dynamic(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_config_with_bad_choice_leaves_model_unchanged():
    config = make_mutator().config_template()
    config["channel_unit_cfg"]["units"] = {"conv0_(0, 8)_8": {"choice": 3.0}}
    model = SmallNet()
    with pytest.raises(ChannelSelectionError, match=r"conv0_\(0, 8\)_8"):
        ChannelMutator.from_config(config, trace_fn=HAND).prepare_from_supernet(model)
    assert not _has_dynamic(model)


def test_per_unit_init_args_from_config():
    mutator = ChannelMutator(channel_unit_cfg=dict(type="SequentialMutableChannelUnit",
                                                   default_args=dict(divisor=2),
                                                   units={"conv2_(0, 6)_6": {"init_args": {"divisor": 3}}}),
                             parse_cfg=dict(demo_input=(1, 3, 8, 8)), trace_fn=HAND)
    mutator.prepare_from_supernet(SmallNet())
    assert mutator._by_name["conv2_(0, 6)_6"].divisor == 3
    assert mutator._by_name["conv0_(0, 8)_8"].divisor == 2
    mutator.set_global_ratio(0.4)
    assert mutator._by_name["conv2_(0, 6)_6"].active_channels == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(channel_unit_cfg="L3MutableChannelUnit"), r"L3MutableChannelUnit.*L1MutableChannelUnit"),
    (dict(channel_unit_cfg=dict(type="L1MutableChannelUnit", extra=1)), "extra"),
    (dict(channel_unit_cfg=42), "channel_unit_cfg"),
    (dict(parse_cfg=dict(type="Magic")), "Magic"),
    (dict(parse_cfg=dict(tracer_type="JitTracer")), "JitTracer"),
    (dict(parse_cfg=dict(demo_input=(1, -3))), "demo_input"),
    (dict(parse_cfg=dict(demo_input="big")), "demo_input"),
    (dict(fixed="conv0"), "fixed"),
    (dict(trace_fn=42), "trace_fn must be callable"),
    (dict(channel_unit_cfg=dict(type="L1MutableChannelUnit", units={"u": 0.5})), "units"),
    (dict(channel_unit_cfg=dict(type="L1MutableChannelUnit", units="/no/such/file.json")), "cannot read"),
])
def test_bad_mutator_arguments_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ChannelMutator(**kwargs)


def test_from_config_rejects_other_types_and_keys():
    with pytest.raises(ConfigError, match="not a ChannelMutator"):  # registered, but a unit kind
        ChannelMutator.from_config({"type": "L1MutableChannelUnit"})
    with pytest.raises(ConfigError, match="NoSuchMutator"):
        ChannelMutator.from_config({"type": "NoSuchMutator"})
    with pytest.raises(ConfigError, match="bogus"):
        ChannelMutator.from_config({"type": "ChannelMutator", "bogus": 1})
    with pytest.raises(ConfigError, match="dict"):
        ChannelMutator.from_config("ChannelMutator")


def test_unknown_init_arg_for_the_unit_type_names_the_unit():
    mutator = ChannelMutator(dict(type="SequentialMutableChannelUnit", default_args=dict(candidate_choices=[0.5])),
                             parse_cfg=dict(demo_input=(1, 3, 8, 8)), trace_fn=HAND)
    model = SmallNet()
    with pytest.raises(ConfigError, match="candidate_choices"):
        mutator.prepare_from_supernet(model)
    assert not _has_dynamic(model)


# ------------------------------------------------------------------------------------------------------- fixed
def test_fixed_modules_keep_their_shape():
    model, mutator = prepared(fixed=["gconv"])
    fixed_names = {u.name for u in mutator.units if u.fixed}
    assert {"conv4_(0, 8)_8", "gconv_(0, 8)_8"} <= fixed_names
    mutator.set_global_ratio(0.5)
    exported = mutator.export(model)
    assert exported.gconv.weight.shape == model.gconv.weight.shape
    assert exported.conv0.out_channels == 4
    assert mutator.config_template()["fixed"] == ["gconv"]


def test_fixed_prefix_and_missing_module():
    _, mutator = prepared(fixed=["conv4"])
    assert not any("conv4" in u.name for u in mutator.mutable_units)
    model = SmallNet()
    with pytest.raises(ConfigError, match="layer9"):
        make_mutator(fixed=["conv0", "layer9"]).prepare_from_supernet(model)
    assert not _has_dynamic(model)


# ------------------------------------------------------------------------------------------------ importance
def test_taylor_through_the_mutator():
    model, mutator = prepared("TaylorMutableChannelUnit")
    model.train()
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        mutator.update_importance()
    assert all(u.num_updates == 2 for u in mutator.mutable_units)
    mutator.set_global_ratio(0.5)
    unit = mutator._by_name["conv0_(0, 8)_8"]
    expected = unit.channel_importance().topk(4).indices.sort().values
    assert torch.equal(unit.current_index, expected)
    mutator.reset_importance()
    assert all(u.num_updates == 0 for u in mutator.mutable_units)


# ---------------------------------------------------------------------------------------------------- summary
def test_summary_counts_params_and_flops():
    model, mutator = prepared()
    x = torch.randn(1, 3, 8, 8)
    full = mutator.summary(model, x)
    assert full["params_before"] == full["params_after"] == sum(p.numel() for p in SmallNet().parameters())
    assert full["flops_before"] == full["flops_after"] > 0
    mutator.set_global_ratio(0.5)
    half = mutator.summary(model, (1, 3, 8, 8))
    assert half["params_before"] == full["params_before"]
    assert half["params_after"] < 0.6 * half["params_before"]
    assert half["flops_after"] < 0.6 * half["flops_before"]
    table = str(half)
    assert "params" in table and "flops" in table and f"{half['params_after']:,}" in table
    json.dumps(dict(half))


# ------------------------------------------------------------------------------------- real tracer, real models
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_half_width_export_equals_dynamic(name):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    mutator = ChannelMutator("L1MutableChannelUnit",
                             parse_cfg=dict(type="ChannelAnalyzer", demo_input=(1, 3, 64, 64), tracer_type="auto"))
    mutator.prepare_from_supernet(model)
    assert len(mutator.mutable_units) > 5
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
    mutator.set_global_ratio(0.5)
    exported = mutator.export(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in exported.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    mutator.set_global_ratio(1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
    json.dumps(mutator.config_template(with_unit_init_args=True, with_channels=True))


def test_unit_that_cannot_be_pruned_is_fixed_with_a_warning():
    specs = small_net_specs()
    specs[4].groups = 1                                 # conv4 -> gconv: the unit adopts gconv's groups
    specs[2].input_related.append(in_ref("gconv", 0, 6))  # nonsense range on a grouped conv: cannot be balanced
    model = SmallNet()
    with pytest.warns(UserWarning, match=r"conv2_\(0, 6\)_6.*not pruned"):
        mutator = make_mutator(trace_fn=lambda *a, **k: specs)
        mutator.prepare_from_supernet(model)
    assert "conv2_(0, 6)_6" not in mutator.current_choices
    assert mutator._by_name["conv4_(0, 8)_8"].groups == 2
    with pytest.raises(ConfigError, match="balanced per group"):
        make_mutator(strict=True, trace_fn=lambda *a, **k: specs).prepare_from_supernet(SmallNet())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("unit_type", ["SequentialMutableChannelUnit", "L1MutableChannelUnit",
                                       "BNScaleMutableChannelUnit"])
def test_switching_choices_on_cuda_never_syncs(unit_type):
    model, mutator = prepared(unit_type)
    model.cuda()
    subnets = [mutator.sample_choices() for _ in range(3)]
    for unit in mutator.mutable_units:
        unit.current_index  # indices chosen before model.cuda() follow the model on first use (a one-time copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for choices in subnets:
            mutator.set_choices(choices)
        mutator.set_global_ratio(0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(u.current_index.is_cuda for u in mutator.mutable_units)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(mutator.export(model)(x), model(x), rtol=1e-4, atol=1e-4)


def test_trace_fn_partial_with_its_own_tracer_is_refused():
    # The parser passes tracer= from parse_cfg, which would silently override the partial's.
    with pytest.raises(ConfigError, match="tracer_type"):
        make_mutator(trace_fn=functools.partial(trace_channel_units, tracer="fx"))
    make_mutator(trace_fn=functools.partial(trace_channel_units, gqa=False))  # other keywords are fine
