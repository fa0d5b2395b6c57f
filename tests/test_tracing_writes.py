"""Writes of one tensor into another (``x[i] = v``, ``copy_``, ``index_add_``) and multi-output ops in the recorded
forward: channels must never leave the tracer's sight, or a pruned group would meet a layer expecting all of it."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.mutators import ChannelMutator
from pyprune.tracing import PruningTraceWarning, trace_channel_units

TRACERS = ["fx", "torch_function"]
RECORDED = ["torch_function"]  # fx cannot trace item assignment into a traced tensor: only a recording sees it


def unit_of(specs, name):
    return next(s for s in specs if any(r.name == name and r.is_output_channel for r in s.output_related))


def input_layers(spec):
    return {r.name for r in spec.input_related}


class PooledIntoBuffer(nn.Module):
    """torchvision's MultiScaleRoIAlign pattern: features written into a buffer made with a literal channel count."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        features = self.conv(x)
        out = torch.zeros(2, 8, 2, 2)  # batch and channels spelled out
        out[:] = F.adaptive_avg_pool2d(features, 2)
        return self.head(out.flatten(1))


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_write_into_an_untracked_tensor_fixes_the_written_group(tracer):
    with pytest.warns(PruningTraceWarning, match="op 'setitem'.*writes channels into a tensor"):
        specs = trace_channel_units(PooledIntoBuffer(), torch.rand(2, 3, 4, 4), tracer=tracer)
    assert unit_of(specs, "conv").fixed  # pruned, the buffer would still hold 8 channels for the head


class WriteAcrossRows(nn.Module):
    """``a[:, :, 0] = b[:, :, 0]``: the written values land on the same channels of ``a``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        a[:, :, 0] = b[:, :, 0]
        return self.head(F.relu(a)).mean((2, 3))


@pytest.mark.parametrize("tracer", RECORDED)
def test_a_write_along_other_dims_couples_the_groups_and_stays_prunable(tracer):
    model, x = WriteAcrossRows(), torch.rand(2, 3, 6, 6)
    specs = trace_channel_units(model, x, tracer=tracer)
    unit = unit_of(specs, "a")
    assert not unit.fixed and {r.name for r in unit.output_related} == {"a", "b"} and input_layers(unit) == {"head"}
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=x, tracer_type=tracer))
    mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(0.5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(mutator.export(model).eval()(x), model(x))


class ZeroFirstChannel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        y[:, 0] = 0.0  # channel 0 means another channel once channels are removed
        return self.head(y).mean((2, 3))


@pytest.mark.parametrize("tracer", RECORDED)
def test_a_write_at_picked_channels_fixes_the_group(tracer):
    with pytest.warns(PruningTraceWarning, match="selects single channels"):
        specs = trace_channel_units(ZeroFirstChannel(), torch.rand(2, 3, 4, 4), tracer=tracer)
    assert unit_of(specs, "conv").fixed


class IndexAdd(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.a, self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        a = a.index_add(self.dim, torch.tensor([0, 1]), b.narrow(self.dim, 0, 2))
        return self.head(a).mean((2, 3))


@pytest.mark.parametrize("tracer", TRACERS)
def test_index_add_couples_along_other_dims_and_fixes_along_channels(tracer):
    x = torch.rand(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        along_rows = unit_of(trace_channel_units(IndexAdd(2), x, tracer=tracer), "a")
        along_channels = unit_of(trace_channel_units(IndexAdd(1), x, tracer=tracer), "a")
    assert not along_rows.fixed and {r.name for r in along_rows.output_related} == {"a", "b"}
    assert along_channels.fixed


class Halves(nn.Module):
    """Chunks into two convs; ``dim`` 0 (batch) keeps every channel in both pieces, dim 1 splits the channels."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.stem, self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8 // (dim + 1), 5, 1), nn.Conv2d(8 // (dim + 1), 5, 1)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, self.dim)
        return torch.cat([self.c1(a), self.c2(b)], 0)


@pytest.mark.parametrize("tracer", TRACERS)
def test_the_pieces_of_a_multi_output_op_carry_their_channels(tracer):
    """The recorded forward indexes a tuple output as fx does: each piece keeps its channel space."""
    x = torch.rand(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_batch = unit_of(trace_channel_units(Halves(0), x, tracer=tracer), "stem")
        by_channel = unit_of(trace_channel_units(Halves(1), x, tracer=tracer), "stem")
    assert not by_batch.fixed and input_layers(by_batch) == {"c1", "c2"}
    assert by_channel.fixed  # each conv reads half a group: not prunable as one unit
