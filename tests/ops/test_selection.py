"""Setting a DynamicOp's channels: every accepted choice form, the trusted index path, and bad choices or inputs
(one ChannelSelectionError naming the layer; the op unchanged)."""
import copy

import pytest
import torch
from torch import nn

import pyprune.ops as ops
from helpers import same_index
from pyprune.errors import ChannelSelectionError


# ------------------------------------------------------------------------------------------------------- choice forms
def test_trusted_index_path_equals_validated_path():
    op = ops.to_dynamic(nn.Linear(6, 5))
    op.set_out_index(torch.tensor([0, 3]))
    op.set_in_index(torch.arange(6))  # a full-length index is "all"
    assert op.in_index is None and op.active_in_channels == 6
    via_trusted = op.export().weight
    op.set_out_channels([3, 0])        # given unsorted: sorted
    assert torch.equal(op.out_index, torch.tensor([0, 3]))
    assert torch.equal(op.export().weight, via_trusted)
    version = op.selection_version
    op.set_out_index(None)
    assert op.out_index is None and op.active_out_channels == 5 and op.selection_version == version + 1


@pytest.mark.parametrize("choice, expected", [
    (0.5, [0, 1, 2, 3]), (1.0, None), (0.01, [0]), (0.3, [0, 1]), (3, [0, 1, 2]), (8, None),
    ([True, False] * 4, [0, 2, 4, 6]), (torch.tensor([7, 1, 4]), [1, 4, 7]), ([5, 2], [2, 5]),
])
def test_choice_forms(choice, expected):
    op = ops.to_dynamic(nn.Conv2d(3, 8, 1))
    op.set_out_channels(choice)
    assert (op.out_index is None) if expected is None else op.out_index.tolist() == expected
    assert op.out_index is None or op.out_index.dtype == torch.int64


def test_input_with_wrong_channel_count_names_the_layer():
    op = ops.to_dynamic(nn.Conv2d(8, 4, 1))
    op.pyprune_name = "stem.conv"
    op.set_in_channels(0.5)
    with pytest.raises(ChannelSelectionError, match=r"stem\.conv .*input has 8 channels.*active input channels "
                                                    r"are 4 of 8"):
        op(torch.randn(1, 8, 3, 3))
    linear = ops.to_dynamic(nn.Linear(6, 3))
    linear.set_in_channels(2)
    with pytest.raises(ChannelSelectionError, match="DynamicLinear.*input has 6 features"):
        linear(torch.randn(2, 6))


# -------------------------------------------------------------------------------------------------------- bad input
BAD_CHOICES = {
    "ratio_zero": (0.0, r"ratio 0\.0 is not in \(0, 1\]"),
    "ratio_above_one": (1.5, r"ratio 1\.5 is not in \(0, 1\]"),
    "ratio_nan": (float("nan"), r"ratio nan is not in \(0, 1\]"),
    "ratio_inf": (float("inf"), r"ratio inf is not in \(0, 1\]"),
    "ratio_negative": (-0.1, r"ratio -0\.1 is not in \(0, 1\]"),
    "count_zero": (0, r"count 0 is out of range \[1, 8\]"),
    "count_too_big": (9, r"count 9 is out of range \[1, 8\]"),
    "bool_scalar": (True, "True is not a channel choice"),
    "mask_too_short": (torch.ones(7, dtype=torch.bool), r"mask must have shape \[8\], got \[7\]"),
    "mask_empty": (torch.zeros(8, dtype=torch.bool), "keeps no channel"),
    "mask_float": (torch.ones(8), "int64 tensor, got dtype torch.float32"),
    "mask_wrong_device": (torch.ones(8, dtype=torch.bool, device="meta"), "on meta but the layer is on cpu"),
    "index_out_of_range": (torch.tensor([0, 8]), "index 8 is out of range for 8 channels"),
    "index_negative": ([-1, 2], "index -1 is out of range"),
    "index_duplicated": (torch.tensor([3, 1, 3]), "index 3 is given more than once"),
    "index_float": (torch.tensor([0.0, 1.0]), "int64 tensor, got dtype torch.float32"),
    "index_int32": (torch.tensor([0, 1], dtype=torch.int32), "int64 tensor, got dtype torch.int32"),
    "index_2d": (torch.tensor([[0, 1]]), r"must be 1-D, got shape \(1, 2\)"),
    "index_empty_list": ([], "selection is empty"),
    "list_mixed": ([1, True], "only int channel indices or only bools"),
    "string": ("half", "unsupported channel choice of type str"),
}


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("bad", BAD_CHOICES)
@pytest.mark.parametrize("kind", ["conv", "bn"])
def test_bad_choice_names_layer_and_changes_nothing(kind, bad, side):
    op = ops.to_dynamic(nn.Conv2d(8, 8, 3) if kind == "conv" else nn.BatchNorm2d(8))
    op.pyprune_name = "backbone.layer1.0.conv1"
    op.set_out_channels([1, 2, 5])
    if kind == "conv":
        op.set_in_channels(0.5)
    selection = (op.out_index.clone(), None if op.in_index is None else op.in_index.clone(),
                 op.active_out_channels, op.active_in_channels, op.selection_version)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in op.state_dict().items()}
    choice, message = BAD_CHOICES[bad]
    setter = op.set_out_channels if side == "out" else op.set_in_channels
    with pytest.raises(ChannelSelectionError, match=r"backbone\.layer1\.0\.conv1 \(Dynamic\w+\).*" + message):
        setter(choice)
    assert torch.equal(op.out_index, selection[0]) and same_index(op.in_index, selection[1])
    assert (op.active_out_channels, op.active_in_channels, op.selection_version) == selection[2:]
    for name, value in op.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[name]), name


def test_error_names_the_class_without_a_layer_name():
    op = ops.to_dynamic(nn.Linear(4, 4))
    with pytest.raises(ChannelSelectionError, match=r"^DynamicLinear \(DynamicLinear\) input channels: "):
        op.set_in_channels(0)
