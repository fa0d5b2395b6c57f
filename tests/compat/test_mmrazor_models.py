"""mmrazor's small test models (tests/compat/models.py) through a default ChannelMutator, as mmrazor's
test_channel_mutator runs them: prepared, at least one mutable unit, random subnets run and export to the same
output. MultipleUseModel (one conv applied to four inputs) is one of them."""
import pytest
import torch

from compat.models import MMRAZOR_TEST_MODELS, MultipleUseModel
from pyprune.compat.mmrazor import ChannelAnalyzer, ChannelMutator

SIZE = 16


@pytest.mark.parametrize("model_class", MMRAZOR_TEST_MODELS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("unit_type", ["SequentialMutableChannelUnit", "L1MutableChannelUnit"])
def test_random_subnets_run_and_export(model_class, unit_type):
    model = model_class().eval()
    mutator = ChannelMutator(channel_unit_cfg=unit_type, parse_cfg=ChannelAnalyzer(demo_input=(1, 3, SIZE, SIZE)))
    mutator.prepare_from_supernet(model)
    assert len(mutator.mutable_units) >= 1
    x = torch.rand(2, 3, SIZE, SIZE)
    for _ in range(2):
        mutator.set_choices(mutator.sample_choices())
        out = model(x)
        assert out.shape == (2, 1000)
        torch.testing.assert_close(mutator.export(model)(x), out)


def test_a_layer_applied_to_several_inputs_is_one_unit_on_each_side():
    model = MultipleUseModel().eval()
    mutator = ChannelMutator(parse_cfg=dict(demo_input=(1, 3, SIZE, SIZE)))
    mutator.prepare_from_supernet(model)
    units = {unit.name: unit for unit in mutator.mutable_units}
    assert set(units) == {"conv0_(0, 8)_8", "conv_multiple_use_(0, 16)_16", "conv_last_(0, 32)_32"}
    branches = units["conv0_(0, 8)_8"]
    assert [ref.name for ref in branches.output_related] == ["conv0", "conv1", "conv2", "conv3"]
    shared = units["conv_multiple_use_(0, 16)_16"]
    assert [(ref.start, ref.end) for ref in shared.input_related] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    mutator.set_choices({"conv0_(0, 8)_8": 3, "conv_multiple_use_(0, 16)_16": 5})
    small = mutator.export(model)
    assert (small.conv2.out_channels, small.conv_multiple_use.in_channels, small.conv_last.in_channels) == (3, 3, 20)
    x = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(small(x), model(x))
