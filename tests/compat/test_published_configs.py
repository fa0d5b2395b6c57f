"""mmrazor's published pruning configs (tests/compat/fixtures/*.json, written from their documented content) on
models named the way mmcls names them: unit names, the choices they set, and the exported shapes mmrazor gives.

ResNet-34 l1-norm a/b/c (ItePruneAlgorithm, L1 units in ratio mode), GroupFisher ResNet-50 / MobileNetV2 deploy
``fix_subnet`` (SequentialMutableChannelUnit, number mode), DMCP MobileNetV2-100M / ResNet-50-2G and DCFF ResNet-18
mutator configs (their mutator / unit type names registered as aliases, as a user of the registry does), and
AutoSlim's slimmable MobileNetV2 1.5x units.
"""
import json
import warnings
from pathlib import Path

import pytest
import torch

from compat.models import MMClsMobileNetV2, MMClsResNet
from pyprune.compat.mmrazor import MODELS, ChannelMutator, ItePruneAlgorithm, SequentialMutableChannelUnit
from pyprune.errors import ChannelSelectionError, ConfigError
from pyprune.units.leniency import ConfigLeniencyWarning

FIXTURES = Path(__file__).parent / "fixtures"
PARSE = dict(type="ChannelAnalyzer", demo_input=(1, 3, 32, 32), tracer_type="BackwardTracer")

# The DMCP and DCFF configs build pyprune's own DMCPChannelMutator / DMCPChannelUnit and DCFFChannelMutator /
# DCFFChannelUnit (an alias would replace them in the registry); their subnet files load with them.
ALIASES = {}


@pytest.fixture(autouse=True, scope="module")
def mmrazor_aliases():
    """Registered for this module's tests only: other test modules see the registry as pyprune ships it."""
    for alias, cls in ALIASES.items():
        MODELS.register_module(name=alias, module=cls, force=True)
    yield
    for alias in ALIASES:
        MODELS.remove_module(alias)


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def mutator_config(name, **overrides):
    """A fixture holding a whole mmrazor mutator config, its units put back under channel_unit_cfg."""
    data = fixture(name)
    config = {"type": data["type"], "parse_cfg": {**data["parse_cfg"], **PARSE},
              "channel_unit_cfg": {**data["channel_unit_cfg"], "units": data["units"]}}
    return {**config, **overrides}


def mutable_names(model):
    mutator = ChannelMutator(parse_cfg=dict(PARSE))
    mutator.prepare_from_supernet(model)
    return {unit.name for unit in mutator.mutable_units}


# ------------------------------------------------------------------------------------------------- unit names
def test_unit_names_are_mmrazors_on_mmcls_models():
    assert mutable_names(MMClsResNet(34)) == set(fixture("l1_norm_resnet34.json")["targets"]["a"])
    resnet50 = mutable_names(MMClsResNet(50))
    assert resnet50 == set(fixture("dmcp_r50_2g.json")["units"])
    assert "backbone.conv1_(0, 64)_64" in resnet50 and "backbone.layer1.0.conv3_(0, 256)_256" in resnet50
    assert set(fixture("group_fisher_deploy.json")["resnet50"]["fix_subnet"]) < resnet50
    mobilenet = mutable_names(MMClsMobileNetV2())
    assert mobilenet == set(fixture("dmcp_mbv2_100m.json")["units"])
    assert set(fixture("group_fisher_deploy.json")["mobilenet_v2"]["fix_subnet"]) < mobilenet
    assert mutable_names(MMClsResNet(18)) == set(fixture("dcff_resnet18_fix_subnet.json")["units"])


# ------------------------------------------------------------------------------------------------- l1-norm
L1_MUTATOR = dict(type="ChannelMutator", parse_cfg=dict(PARSE),
                  channel_unit_cfg=dict(type="L1MutableChannelUnit", default_args=dict(choice_mode="ratio")))


def test_l1_norm_resnet34_a_from_config_dicts():
    """Config a as mmrazor builds it: architecture and mutator from dicts, one pruning step."""
    target = fixture("l1_norm_resnet34.json")["targets"]["a"]
    algorithm = ItePruneAlgorithm(dict(type="MMClsResNet", depth=34), mutator_cfg=L1_MUTATOR,
                                  target_pruning_ratio=target, step_freq=1)
    assert algorithm.step() and algorithm.done
    widths = {name: int(name.rsplit("_", 1)[1]) for name in target}  # "..._(0, 64)_64" -> 64
    assert algorithm.mutator.current_choices == pytest.approx(
        {name: int(ratio * widths[name]) / widths[name] for name, ratio in target.items()})  # realized ratios
    small = algorithm.export().backbone
    # kept ratio r of C channels -> int(r * C), as mmrazor: 0.7 of 64 is 44
    assert (small.layer1[0].conv1.out_channels, small.layer2[1].conv1.out_channels,
            small.layer3[1].conv1.out_channels, small.layer3[0].conv2.out_channels) == (44, 89, 179, 256)
    assert small.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 512, 1, 1)


@pytest.fixture(scope="module")
def resnet34_l1():
    model = MMClsResNet(34)
    mutator = MODELS.build(L1_MUTATOR)
    mutator.prepare_from_supernet(model)
    return model, mutator


@pytest.mark.parametrize("config, expected", [
    ("b", {"layer1.0.conv1": 32, "layer2.1.conv1": 51, "layer3.4.conv1": 153, "layer4.2.conv1": 512}),
    ("c", {"layer3.0.conv2": 204, "layer3.0.downsample.0": 204, "layer3.5.conv2": 204, "layer1.0.conv1": 64}),
])
def test_l1_norm_resnet34_b_and_c(resnet34_l1, config, expected):
    model, mutator = resnet34_l1
    mutator.set_global_ratio(1.0)
    algorithm = ItePruneAlgorithm(model, mutator, fixture("l1_norm_resnet34.json")["targets"][config], step_freq=1)
    assert algorithm.step()
    for layer, channels in expected.items():
        assert model.backbone.get_submodule(layer).active_out_channels == channels, layer


# ------------------------------------------------------------------------------------------------ GroupFisher
@pytest.mark.parametrize("arch, build, expected", [
    ("resnet50", lambda: MMClsResNet(50), {"conv1": 61, "layer1.0.conv1": 27, "layer1.0.conv3": 241,
                                           "layer1.0.downsample.0": 241, "layer1.2.conv3": 241,
                                           "layer2.0.conv3": 512, "layer4.2.conv2": 384}),
    ("mobilenet_v2", MMClsMobileNetV2, {"conv1.conv": 21, "layer1.0.conv.0.conv": 21, "layer1.0.conv.1.conv": 10,
                                        "layer2.0.conv.0.conv": 45, "layer2.0.conv.1.conv": 45,
                                        "layer6.1.conv.0.conv": 810, "conv2.conv": 1280}),
])
def test_group_fisher_deploy_fix_subnet(arch, build, expected):
    """GroupFisherDeploySubModel: a default (number-mode) ChannelMutator, set_choices(fix_subnet), export."""
    model = build()
    mutator = ChannelMutator(channel_unit_cfg=SequentialMutableChannelUnit, parse_cfg=dict(PARSE))
    mutator.prepare_from_supernet(model)
    fix_subnet = fixture("group_fisher_deploy.json")[arch]["fix_subnet"]
    mutator.set_choices(fix_subnet)
    assert {name: mutator.current_choices[name] for name in fix_subnet} == fix_subnet
    small = mutator.export(model).eval()
    for layer, channels in expected.items():
        assert small.backbone.get_submodule(layer).out_channels == channels, layer
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(small(x), model.eval()(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ DMCP / DCFF
def test_dmcp_mobilenet_v2_clamps_the_count_above_the_width_with_one_warning():
    model = MMClsMobileNetV2()
    mutator = ChannelMutator.from_config(mutator_config("dmcp_mbv2_100m.json"))
    with pytest.warns(ConfigLeniencyWarning, match=r"backbone\.layer6\.0\.conv\.0\.conv_\(0, 576\)_576 \(693 > 576\)"):
        mutator.prepare_from_supernet(model)
    small = mutator.export(model)
    assert small.backbone.layer6[0].conv[0].conv.out_channels == 576
    assert small.backbone.conv1.conv.out_channels == 9 and small.backbone.layer7[0].conv[2].conv.out_channels == 192
    assert small.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    strict = ChannelMutator.from_config(mutator_config("dmcp_mbv2_100m.json", strict=True))
    with pytest.raises(ConfigError, match="693 > 576"):
        strict.prepare_from_supernet(MMClsMobileNetV2())


def test_dmcp_resnet50_and_dcff_resnet18_subnets_load():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both configs fit their models exactly
        model = MMClsResNet(50)
        mutator = ChannelMutator.from_config(mutator_config("dmcp_r50_2g.json"))
        mutator.prepare_from_supernet(model)
        small = mutator.export(model).backbone
        assert (small.conv1.out_channels, small.layer1[0].conv3.out_channels, small.layer2[0].conv3.out_channels,
                small.layer4[1].conv2.out_channels) == (52, 106, 155, 461)
        model = MMClsResNet(18)
        mutator = ChannelMutator.from_config(mutator_config("dcff_resnet18_fix_subnet.json"))
        mutator.prepare_from_supernet(model)
    small = mutator.export(model).backbone
    # ratio-mode choices k / C give k back: 0.640625 of 64 = 41, 0.59375 of 128 = 76, 0.69921875 of 512 = 358
    assert (small.layer1[0].conv1.out_channels, small.layer2[0].conv2.out_channels,
            small.layer2[0].downsample[0].out_channels, small.layer4[1].conv1.out_channels) == (41, 76, 76, 358)


# ------------------------------------------------------------------------------------------------ slimmable
def test_slimmable_mobilenet_v2_units_and_their_subnets():
    """AutoSlim's slimmable MobileNetV2 1.5x: SlimmableChannelUnits from a units file, each subnet one candidate
    index (mmrazor's candidate lists repeat widths; pyprune keeps each width once)."""
    units = fixture("slimmable_mbv2_1.5x.json")["units"]
    model = MMClsMobileNetV2(widen_factor=1.5).eval()
    mutator = ChannelMutator(dict(type="SlimmableChannelUnit", units=units), parse_cfg=dict(PARSE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mutator.prepare_from_supernet(model)
    assert {u.name for u in mutator.mutable_units} == set(units)
    assert mutator.current_choices == {name: cfg["choice"] for name, cfg in units.items()}
    first = mutator._by_name["backbone.conv1.conv_(0, 48)_48"]
    assert first.candidate_choices == [8, 32]
    with pytest.raises(ChannelSelectionError, match="candidate"):
        first.current_choice = 16
    x = torch.randn(1, 3, 32, 32)
    for subnet, expected in ((0, (8, 48, 720)), (1, (8, 56, 1440))):
        mutator.set_choices({name: cfg["init_args"]["candidate_choices"][subnet] for name, cfg in units.items()})
        small = mutator.export(model).eval()
        backbone = small.backbone
        assert (backbone.conv1.conv.out_channels, backbone.layer4[0].conv[2].conv.out_channels,
                backbone.layer6[1].conv[0].conv.out_channels) == expected
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-4)
