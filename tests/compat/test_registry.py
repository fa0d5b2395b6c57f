"""The registry configs use (``dict(type=...)``): mmrazor's and mmengine's ``MODELS.build`` and ``Registry``."""
import pytest
import torch
from torch import nn

from pyprune.compat.mmrazor import MODELS, ChannelMutator, ItePruneAlgorithm, L1MutableChannelUnit, Registry
from pyprune.errors import ConfigError


def test_builtin_classes_are_built_by_name_and_scope_is_ignored():
    mutator = MODELS.build(dict(_scope_="mmrazor", type="ChannelMutator",
                                channel_unit_cfg=dict(type="L1MutableChannelUnit")))
    assert isinstance(mutator, ChannelMutator) and mutator.unit_class is L1MutableChannelUnit
    assert MODELS.get("mmrazor.ItePruneAlgorithm") is ItePruneAlgorithm
    assert "SequentialMutableChannelUnit" in MODELS


def test_torchvision_scope_builds_a_torchvision_model_without_weights():
    model = MODELS.build(dict(_scope_="torchvision", type="resnet18", num_classes=7))
    assert model.fc.out_features == 7
    assert MODELS.build(dict(type="torchvision.mobilenet_v2", num_classes=3)).classifier[-1].out_features == 3


def test_user_classes_register_by_name_and_duplicates_are_refused():
    registry = Registry("thing")

    @registry.register_module()
    class Net(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 1)

    assert registry.build(dict(type="Net", width=5)).conv.out_channels == 5
    assert registry.build(dict(type="Net"), width=6).conv.out_channels == 6  # default_args fill missing keys
    with pytest.raises(ConfigError, match="already registered"):
        registry.register_module(name="Net", module=nn.Identity)
    registry.register_module(name="Net", module=nn.Identity, force=True)
    assert isinstance(registry.build(dict(type="Net")), nn.Identity)


@pytest.mark.parametrize("cfg, message", [
    (dict(type="NoSuchModel"), "no model type named 'NoSuchModel'"),
    (dict(width=3), "needs a 'type' key"),
    (dict(type="ChannelMutator", bogus=1), "cannot build model 'ChannelMutator'.*bogus"),
    (dict(_scope_="torchvision", type="resnet7"), "torchvision has no classification model named 'resnet7'"),
])
def test_bad_configs_raise_one_clear_error(cfg, message):
    with pytest.raises(ConfigError, match=message):
        MODELS.build(cfg)


def test_an_object_is_passed_through():
    model = nn.Linear(2, 2)
    assert MODELS.build(model) is model
    assert isinstance(MODELS.build(dict(type=nn.Linear, in_features=2, out_features=3))(torch.ones(2)), torch.Tensor)
