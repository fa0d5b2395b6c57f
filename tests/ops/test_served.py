"""Layers with their own forward (subclasses of known layers that override ``forward``) run at the active width
through their own code: tensors and width attributes served, running statistics carried back, export to their own
class; layers whose forward cannot be served are fixed by the tracer with a warning naming the class."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyprune.ops as ops
from pyprune.mutators import ChannelMutator
from pyprune.ops.served import ServedForward, serving_probe
from pyprune.tracing import PruningTraceWarning
from pyprune.errors import UntraceableOpError
from helpers import TOL, randomize


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: F.batch_norm on its own tensors, then an activation submodule."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        out = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                           self.training or not self.track_running_stats, factor, self.eps)
        return self.act(out)


class ScaledConv(nn.Conv2d):
    """timm's ScaledStdConv2d pattern: weight standardised per output channel inside forward, an extra per-output
    gain ``[C_out, 1, 1, 1]``, ``self.out_channels`` read in a reshape."""

    def __init__(self, cin, cout, k=3):
        super().__init__(cin, cout, k, padding=1)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=self.gain.view(-1), training=True, momentum=0.0, eps=1e-5)
        return F.conv2d(x, weight.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class PermutedLayerNorm(nn.LayerNorm):
    """timm's LayerNorm2d pattern with its own constructor: channels first, normalised by permuting."""

    def __init__(self, channels, eps=1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class FixedWidthNorm(nn.BatchNorm2d):
    """A forward that cannot run narrower: a per-channel table shaped [1, C, 1, 1] the op does not know about."""

    def __init__(self, channels):
        super().__init__(channels)
        self.register_buffer("table", torch.rand(1, channels, 1, 1))

    def forward(self, x):
        return super().forward(x) * self.table


class Net(nn.Module):
    def __init__(self, norm=BatchNormAct):
        super().__init__()
        self.stem = ScaledConv(3, 8)
        self.norm = norm(8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.ln = PermutedLayerNorm(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.ln(self.conv(self.norm(self.stem(x))))
        return self.head(x.mean((2, 3)))


def _served(module, index):
    op = ops.to_dynamic(randomize(module))
    assert isinstance(op, ServedForward) and isinstance(op, type(module))
    op.set_out_index(index)
    return op


def test_batchnorm_with_own_forward_keeps_it_and_updates_only_kept_running_stats():
    op = _served(BatchNormAct(8), torch.tensor([0, 2, 3, 7]))
    reference = copy.deepcopy(op).export()          # a plain BatchNormAct(4) of the kept channels
    assert type(reference) is BatchNormAct and reference.num_features == 4 and reference.weight.shape == (4,)
    before = op.running_mean.clone()
    x = torch.randn(5, 4, 3, 3) - 3.0               # negative: the ReLU of the own forward shows in the output
    op.train(), reference.train()
    torch.testing.assert_close(op(x), reference(x), **TOL)
    kept = torch.tensor([0, 2, 3, 7])
    torch.testing.assert_close(op.running_mean[kept], reference.running_mean, **TOL)
    torch.testing.assert_close(op.running_var[kept], reference.running_var, **TOL)
    dropped = torch.tensor([1, 4, 5, 6])
    assert torch.equal(op.running_mean[dropped], before[dropped])
    assert op.num_features == 8 and isinstance(op.weight, nn.Parameter)  # served only while the forward runs
    op.eval(), reference.eval()
    torch.testing.assert_close(op(x), reference(x), **TOL)


def test_conv_with_extra_per_channel_tensor_serves_it_at_the_kept_outputs():
    op = _served(ScaledConv(5, 8), torch.tensor([1, 2, 6]))
    op.set_in_index(torch.tensor([0, 3, 4]))
    exported = op.export()
    assert type(exported) is ScaledConv and exported.gain.shape == (3, 1, 1, 1)
    assert (exported.out_channels, exported.in_channels) == (3, 3) and exported.weight.shape == (3, 3, 3, 3)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y = op(x)
    torch.testing.assert_close(y, exported(x), **TOL)
    y.square().sum().backward()
    assert op.gain.grad.shape == (8, 1, 1, 1) and torch.count_nonzero(op.gain.grad[[0, 3, 4, 5, 7]]) == 0
    assert op.weight.grad.shape == (8, 5, 3, 3)


def test_channels_first_layer_norm_with_own_constructor_is_probed_on_dim_1():
    module = PermutedLayerNorm(6)
    assert serving_probe(module).channel_dim == 1
    op = _served(module, torch.tensor([0, 1, 4]))
    x = torch.randn(2, 3, 4, 4)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (3,), op.weight[[0, 1, 4]], op.bias[[0, 1, 4]],
                            op.eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(op(x), expected, **TOL)
    assert op.export().normalized_shape == (3,)


def test_unservable_forward_is_refused_with_the_reason():
    probe = serving_probe(FixedWidthNorm(8))
    assert not probe.ok and "shape" in probe.reason or "RuntimeError" in probe.reason
    assert ops.to_dynamic(FixedWidthNorm(8)) is None
    assert not ops.is_prunable_layer(FixedWidthNorm(8))


def test_prepared_model_with_own_forward_layers_equals_its_export_in_train_and_eval():
    torch.manual_seed(0)
    model = Net()
    mutator = ChannelMutator(channel_unit_cfg="L1MutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    mutator.prepare_from_supernet(model)
    served = [name for name, m in model.named_modules() if isinstance(m, ServedForward)]
    assert served == ["stem", "norm", "ln"]
    assert len(mutator.mutable_units) == 2
    mutator.set_choices({unit.name: 3 for unit in mutator.mutable_units})
    x = torch.randn(4, 3, 8, 8)
    model.train()
    model(x)                                         # moves the kept running stats
    small = mutator.export(model)
    assert type(small.norm) is BatchNormAct and small.norm.num_features == 3
    for mode in (False, True):
        model.train(mode), small.train(mode)
        torch.testing.assert_close(model(x), small(x), **TOL)


def test_layer_whose_forward_cannot_be_served_is_fixed_with_a_warning_naming_its_class():
    model = Net(norm=FixedWidthNorm)
    mutator = ChannelMutator(channel_unit_cfg="L1MutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    with pytest.warns(PruningTraceWarning, match="FixedWidthNorm overrides forward"):
        mutator.prepare_from_supernet(model)
    assert type(model.norm) is FixedWidthNorm
    mutator.set_global_ratio(0.5)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), mutator.export(model)(x), **TOL)
    strict = ChannelMutator(channel_unit_cfg="L1MutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 8, 8)),
                            strict=True)
    with pytest.raises(UntraceableOpError, match="FixedWidthNorm"):
        strict.prepare_from_supernet(Net(norm=FixedWidthNorm))


def test_compact_training_serves_the_held_tensors_to_the_own_forward():
    torch.manual_seed(0)
    model = Net()
    mutator = ChannelMutator(channel_unit_cfg="L1MutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    mutator.prepare_from_supernet(model)
    mutator.set_choices({unit.name: 4 for unit in mutator.mutable_units})
    gathered = copy.deepcopy(model)
    x, target = torch.randn(4, 3, 8, 8), torch.randn(4, 4)
    results = []
    for net, compact in ((gathered, False), (model, True)):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        session = ops.compact_training(net, optimizer) if compact else None
        if compact:
            assert net.stem.weight.shape == (4, 3, 3, 3) and net.stem.gain.shape == (4, 1, 1, 1)
        for _ in range(3):
            optimizer.zero_grad()
            F.mse_loss(net(x), target).backward()
            optimizer.step()
        if session is not None:
            session.exit()
        results.append(net.eval()(x))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
