"""Conv1d / Conv3d / BatchNorm1d (3-D input) / BatchNorm3d as DynamicOps (mmrazor has dynamic ops for the whole
family): forward at a selection equals the plain layer on the kept channels, export gives the plain type, the
tracer prunes models made of them, and L1 importance ranks Conv3d rows (mmrazor's test_convnd)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyprune.ops as ops
from pyprune.compat.mmrazor import ChannelMutator, L1MutableChannelUnit
from pyprune.channels import ChannelRef, UnitSpec

KEEP_OUT, KEEP_IN = torch.tensor([0, 2, 3, 6]), torch.tensor([1, 3, 4, 5])


@pytest.mark.parametrize("layer, spatial", [
    (nn.Conv1d(8, 8, 3, padding=1), (10,)),
    (nn.Conv1d(8, 8, 3, padding=2, dilation=2, padding_mode="circular"), (10,)),
    (nn.Conv3d(8, 8, 3, padding=1, stride=2), (5, 6, 6)),
    (nn.Conv3d(8, 8, 3, padding=1, groups=2), (4, 5, 5)),
])
def test_conv_nd_matches_the_plain_conv_on_the_kept_channels(layer, spatial):
    balanced = torch.tensor([0, 2, 5, 6])  # two per group of 4, for the grouped conv
    keep_out, keep_in = (KEEP_OUT, KEEP_IN) if layer.groups == 1 else (balanced, balanced)
    op = ops.to_dynamic(layer)
    op.set_out_channels(keep_out)
    op.set_in_channels(keep_in)
    x = torch.randn(2, 4, *spatial)
    plain = op.export()
    assert type(plain) is type(layer) and (plain.in_channels, plain.out_channels) == (4, 4)
    full_input = torch.zeros(2, 8, *spatial).index_copy(1, keep_in, x)  # pruned inputs contribute nothing
    reference = layer._conv_forward(full_input, layer.weight, layer.bias).index_select(1, keep_out)
    torch.testing.assert_close(op(x), reference)
    torch.testing.assert_close(plain(x), op(x))
    assert op(x[0]).shape[0] == 4  # unbatched input


def test_depthwise_conv1d_is_one_selection():
    op = ops.to_dynamic(nn.Conv1d(8, 8, 3, padding=1, groups=8))
    op.set_out_channels(KEEP_OUT)
    assert op.active_in_channels == 4 and op.active_groups == 4
    x = torch.randn(2, 4, 7)
    torch.testing.assert_close(op(x), op.export()(x))


@pytest.mark.parametrize("layer, spatial", [(nn.BatchNorm1d(8), (6,)), (nn.BatchNorm3d(8), (3, 4, 4))])
def test_batch_norm_nd_updates_only_the_kept_running_stats(layer, spatial):
    op = ops.to_dynamic(layer)
    op.set_out_channels(KEEP_OUT)
    before = op.running_mean.clone()
    x = torch.randn(4, 4, *spatial) + 3.0
    out = op.train()(x)
    expected = F.batch_norm(x, None, None, op.weight[KEEP_OUT], op.bias[KEEP_OUT], True)
    torch.testing.assert_close(out, expected)
    moved = torch.zeros(8, dtype=torch.bool).index_fill_(0, KEEP_OUT, True)
    assert not torch.equal(op.running_mean[moved], before[moved])
    assert torch.equal(op.running_mean[~moved], before[~moved])
    plain = op.export().eval()
    assert type(plain) is type(layer)
    torch.testing.assert_close(plain(x), op.eval()(x))


class Net1d(nn.Module):
    """conv-bn, depthwise conv, grouped conv over sequences ``[N, 3, L]``."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.c2 = nn.Conv1d(8, 16, 1, groups=2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.c2(self.dw(F.relu(self.b1(self.c1(x))))).mean(-1))


class Net3d(nn.Module):
    """conv-bn and a residual conv-bn over volumes ``[N, 3, D, H, W]``."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8)
        self.c2, self.b2 = nn.Conv3d(8, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm3d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        a = F.relu(self.b1(self.c1(x)))
        return self.fc((self.b2(self.c2(a)) + a).mean((2, 3, 4)))


@pytest.mark.parametrize("model, shape, mutable", [(Net1d, (2, 3, 16), 2), (Net3d, (2, 3, 4, 6, 6), 1)])
def test_tracer_prunes_models_of_nd_layers(model, shape, mutable):
    model = model().eval()
    mutator = ChannelMutator(parse_cfg=dict(demo_input=shape))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer is understood: nothing is fixed with a warning
        mutator.prepare_from_supernet(model)
    assert len(mutator.mutable_units) == mutable
    mutator.set_global_ratio(0.5)
    x = torch.randn(*shape)
    small = mutator.export(model).eval()
    assert small.c1.out_channels == 4
    torch.testing.assert_close(small(x), model(x))


def test_l1_unit_ranks_conv3d_rows():
    model = nn.Sequential(nn.Conv3d(3, 8, 3), nn.Conv3d(8, 2, 1))
    with torch.no_grad():
        model[0].weight.mul_(torch.arange(1, 9, dtype=torch.float32).view(8, 1, 1, 1, 1))
    unit = L1MutableChannelUnit.from_spec(UnitSpec(8, [ChannelRef("0", 0, 8, True)], [ChannelRef("1", 0, 8, False)]))
    unit.prepare_for_pruning(model)
    assert unit.channel_importance().shape == (8,)
    unit.current_choice = 3
    assert unit.current_index.tolist() == [5, 6, 7]
