"""The tracer hands on zeros of a plain conv / linear layer's output shape instead of computing it: the shape is
the layer's own for every configuration, layers the formula does not cover run for real, and a model whose code
reads values derived from those zeros (a data-dependent shape or branch) is traced again with every layer computed,
so the units are the same as without the shortcut."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.tracing import layer_shapes, record, shape_pass, trace_channel_units

LAYERS = [
    (nn.Conv1d(4, 6, 3), (2, 4, 11)),
    (nn.Conv1d(4, 6, 3, padding="same", dilation=2), (4, 9)),  # unbatched
    (nn.Conv2d(4, 8, 3, stride=2, padding=1), (2, 4, 9, 7)),
    (nn.Conv2d(4, 8, (3, 5), stride=(2, 1), padding=(0, 2), dilation=(1, 2), groups=2), (1, 4, 10, 12)),
    (nn.Conv2d(4, 4, 1, padding="valid", bias=False), (3, 4, 5, 5)),
    (nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1), (1, 2, 4, 7, 7)),
    (nn.Linear(5, 3), (2, 7, 5)),
    (nn.Linear(5, 3, bias=False), (5,)),
]


@pytest.mark.parametrize("layer, shape", LAYERS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
def test_the_zeros_have_the_layers_own_output_shape(layer, shape):
    x = torch.randn(shape)
    skipped = layer_shapes.skipped_output(layer, (x,), {})
    assert skipped is not None and skipped.shape == layer(x).shape and skipped.dtype == x.dtype
    assert not skipped.any()


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x)[..., :2]


@pytest.mark.parametrize("layer, x", [
    (OwnForward(5, 3), torch.randn(2, 5)),  # its own forward: the formula does not know it
    (nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), torch.randn(1, 4, 6, 6)),
    (nn.Conv2d(4, 8, 3), torch.randn(1, 3, 6, 6)),  # a wrong channel count: the layer raises its own error
    (nn.Linear(5, 3), torch.randn(2, 5, dtype=torch.float64)),  # another dtype
])
def test_layers_the_formula_does_not_cover_run_for_real(layer, x):
    assert layer_shapes.skipped_output(layer, (x,), {}) is None


class DataDependentNet(nn.Module):
    """The stem's output decides a branch and a boolean-mask size: both read values, not shapes."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.side = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        if y.mean() > -1:  # always true on real values; a zero tensor would give the same here, but must not be read
            y = y + self.side(y)
        picked = y.mean((2, 3))[y.mean((1, 2, 3)) >= 0]  # a data-dependent row count
        return self.head(picked)


class MaskNet(DataDependentNet):
    """A boolean-mask row count only (no Python branch): torch.fx traces it, its shape pass reads the values."""

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = y + self.side(y)
        return self.head(y.mean((2, 3))[y.mean((1, 2, 3)) >= 0])


def _specs(model, tracer):
    return sorted(repr(spec) for spec in trace_channel_units(model, (2, 3, 8, 8), tracer=tracer))


@pytest.mark.parametrize("net, tracer", [(MaskNet, "fx"), (DataDependentNet, "torch_function")])
def test_a_model_reading_values_gets_the_units_of_a_trace_computing_every_layer(net, tracer, monkeypatch):
    torch.manual_seed(0)
    model = net().eval()
    with_shortcut = _specs(model, tracer)
    calls = []
    real = layer_shapes.skipped_output
    monkeypatch.setattr(record, "skipped_output", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(shape_pass, "skipped_output", lambda *a: calls.append(1) or real(*a))
    assert _specs(model, tracer) == with_shortcut and calls  # the shortcut was tried
    monkeypatch.setattr(record, "skipped_output", lambda *a: None)
    monkeypatch.setattr(shape_pass, "skipped_output", lambda *a: None)
    assert _specs(model, tracer) == with_shortcut  # every layer computed: the same units
