"""DynamicConv2d: grouped and depthwise selections, construction, moving between devices and dtypes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyprune.ops as ops
from helpers import TOL
from pyprune.errors import ChannelSelectionError


# --------------------------------------------------------------------------------------------- grouped / depthwise
def test_depthwise_in_and_out_are_one_selection():
    op = ops.to_dynamic(nn.Conv2d(6, 6, 3, groups=6))
    op.set_in_channels([1, 2, 5])
    assert torch.equal(op.out_index, torch.tensor([1, 2, 5])) and op.in_index is op.out_index
    assert op.active_groups == 3 == op.active_in_channels == op.active_out_channels
    assert op.export().groups == 3


def test_grouped_conv_trusted_path_builds_local_in_index():
    op = ops.to_dynamic(nn.Conv2d(8, 8, 1, groups=2, bias=False))
    op.set_in_index(torch.tensor([1, 2, 4, 7]))
    assert torch.equal(op.in_index, torch.tensor([1, 2, 4, 7]))  # the public index stays global
    assert torch.equal(op._kernel_indices()[1], torch.tensor([[1, 2], [0, 3]]))
    x = torch.randn(1, 4, 2, 2)
    expected = F.conv2d(x, torch.cat([op.weight[:4][:, [1, 2]], op.weight[4:][:, [0, 3]]]), groups=2)
    torch.testing.assert_close(op(x), expected, **TOL)
    with pytest.raises(ChannelSelectionError, match=r"DynamicConv2d.*input channels: 3 channels cannot be split"):
        op.set_in_index(torch.tensor([0, 1, 4]))


@pytest.mark.parametrize("make, choice, side", [
    (lambda: nn.Conv2d(8, 8, 3, groups=4), [0, 1, 2, 3], "in"),          # all in group 0 and 1
    (lambda: nn.Conv2d(8, 8, 3, groups=4), [0, 2, 4, 5], "out"),
    (lambda: nn.Conv2d(8, 8, 3, groups=4), 3, "out"),                    # 3 does not split over 4 groups
    (lambda: nn.GroupNorm(2, 8), [0, 1, 2, 4], "out"),
    (lambda: nn.GroupNorm(2, 8), 0.375, "out"),                          # 3 channels over 2 groups
])
def test_unbalanced_grouped_selection_is_rejected(make, choice, side):
    op = ops.to_dynamic(make())
    op.pyprune_name = "features.3"
    setter = op.set_out_channels if side == "out" else op.set_in_channels
    with pytest.raises(ChannelSelectionError, match=r"features\.3.*groups"):
        setter(choice)
    assert op.out_index is None and op.in_index is None and op.selection_version == 0


def test_ratio_and_count_on_grouped_layers_keep_a_prefix_of_every_group():
    conv = ops.to_dynamic(nn.Conv2d(8, 12, 3, groups=4))
    conv.set_in_channels(0.5)
    conv.set_out_channels(8)
    assert conv.in_index.tolist() == [0, 2, 4, 6] and conv.out_index.tolist() == [0, 1, 3, 4, 6, 7, 9, 10]
    norm = ops.to_dynamic(nn.GroupNorm(2, 8))
    norm.set_out_channels(0.25)
    assert norm.out_index.tolist() == [0, 4]


# -------------------------------------------------------------------------------------- construction, devices, dtypes
def test_constructor_builds_a_full_dynamic_layer():
    op = ops.DynamicConv2d(4, 6, 3, padding=1)
    assert op.active_in_channels == 4 and op.active_out_channels == 6 and op.out_index is None
    op.set_out_channels(2)
    assert op(torch.randn(1, 4, 5, 5)).shape == (1, 2, 5, 5)


def test_moving_the_layer_moves_its_indices():
    op = ops.to_dynamic(nn.Conv2d(4, 4, 3, groups=2))
    op.set_in_channels([0, 3])
    op.set_out_channels([1, 2])
    op.to(torch.float64)
    assert op.in_index.dtype == torch.int64 and op.weight.dtype == torch.float64
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(op(x), op.export()(x))
    op.to("meta")
    assert {op.out_index.device.type, op.in_index.device.type, op._kernel_indices()[1].device.type} == {"meta"}
