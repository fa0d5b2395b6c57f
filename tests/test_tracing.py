"""Tracer unit tests on small hand-made models: each coupling rule, fixed groups, bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import TokenNet
from pyprune.errors import ConfigError, UntraceableOpError
from pyprune.tracing import PruningTraceWarning, trace_channel_units


def prunable(specs):
    return [s for s in specs if not s.fixed]


def refs(spec):
    return {(r.name, r.start, r.end, r.is_output_channel, r.expand) for r in spec.output_related + spec.input_related}


def unit_of(specs, name, is_output=True):
    return next(s for s in specs if any(r.name == name and r.is_output_channel == is_output
                                        for r in s.output_related + s.input_related))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.a(x)
        x = F.adaptive_avg_pool2d(self.b(x), 4)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("tracer", ["fx", "torch_function"])
def test_residual_add_couples_and_flatten_expands(tracer):
    specs = trace_channel_units(Residual(), torch.randn(1, 3, 8, 8), tracer=tracer)
    stream = unit_of(specs, "stem")
    assert refs(stream) >= {("stem", 0, 8, True, 1), ("bn", 0, 8, True, 1), ("a", 0, 8, True, 1),
                            ("a", 0, 8, False, 1), ("b", 0, 8, False, 1)}
    assert not stream.fixed
    head = unit_of(specs, "b")
    assert ("fc", 0, 64, False, 16) in refs(head) and head.num_channels == 4
    assert unit_of(specs, "fc").fixed and "model output" in unit_of(specs, "fc").reason
    assert unit_of(specs, "stem", is_output=False).fixed  # the model's input channels


class ConcatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Conv2d(3, 6, 1)
        self.q = nn.Conv2d(3, 10, 1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 8, 1, groups=4)
        self.r = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.dw(self.bn(torch.cat([self.p(x), self.q(x)], dim=1)))
        left, right = torch.chunk(self.grouped(y), 2, dim=1)
        return self.r(left).mean((2, 3)) + right.mean((2, 3))[:, :2]


def test_concat_depthwise_grouped_and_chunk():
    specs = trace_channel_units(ConcatSplit(), torch.randn(1, 3, 8, 8))
    p, q = unit_of(specs, "p"), unit_of(specs, "q")
    assert ("bn", 0, 6, True, 1) in refs(p) and ("bn", 6, 16, True, 1) in refs(q)
    assert ("dw", 0, 6, False, 1) in refs(p) and ("dw", 6, 16, True, 1) in refs(q)
    assert ("grouped", 6, 16, False, 1) in refs(q)
    out = unit_of(specs, "grouped")
    assert out.groups == 4 and out.fixed  # its halves go different ways (chunk), so it stays whole
    assert "only part of the group" in out.reason


class WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))
        self.other = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.conv(x) * self.scale) + 0 * self.other(x)[:, :2]


def test_channel_sized_parameter_joins_the_group():
    specs = trace_channel_units(WithScale(), torch.randn(1, 3, 4, 4))
    conv = unit_of(specs, "conv")
    assert not conv.fixed
    assert [(r.name, r.start, r.end, r.param_dim) for r in conv.output_related if r.param_dim is not None] == \
        [("scale", 0, 8, 0)]
    assert unit_of(specs, "other").fixed  # sliced to 2 channels: partial


class ScaleReadTwice(WithScale):
    def forward(self, x):
        return self.head(self.conv(x) * self.scale) + self.scale.sum()


@pytest.mark.parametrize("tracer", ["fx", "torch_function"])
def test_class_token_and_position_embedding_join_the_stream(tracer):
    specs = trace_channel_units(TokenNet(), torch.randn(2, 3, 4, 4), tracer=tracer)  # ViT-style tokens
    stream = unit_of(specs, "embed")
    assert not stream.fixed
    assert {(r.name, r.param_dim) for r in stream.output_related if r.param_dim is not None} == \
        {("class_token", 2), ("pos_embedding", 2), ("layer_scale", 0)}


def test_channel_tensor_with_another_use_fixes_the_group():
    specs = trace_channel_units(ScaleReadTwice(), torch.randn(1, 3, 4, 4))
    conv = unit_of(specs, "conv")
    assert conv.fixed and "also used in a way pyprune cannot slice" in conv.reason


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(3, 6, 1)
        self.d = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(y) + self.d(F.relu(self.c(x)))


def test_channel_shuffle_is_fixed_with_warning_and_strict_raises():
    model, x = Shuffle(), torch.randn(1, 3, 4, 4)
    with pytest.warns(PruningTraceWarning, match="splits the channel dim"):
        specs = trace_channel_units(model, x)
    assert unit_of(specs, "a").fixed
    assert not unit_of(specs, "c").fixed  # the untouched branch stays prunable
    with pytest.raises(UntraceableOpError, match=r"view.*fixed=\["):
        trace_channel_units(model, x, strict=True)


def test_user_fixed_modules_and_unknown_name():
    model, x = Residual(), torch.randn(1, 3, 8, 8)
    specs = trace_channel_units(model, x, fixed=["b"])
    assert unit_of(specs, "b").fixed and "fixed by the user" in unit_of(specs, "b").reason
    assert unit_of(specs, "b", is_output=False).fixed  # b's input group too
    with pytest.raises(ConfigError, match="no modules named"):
        trace_channel_units(model, x, fixed=["nope"])
    with pytest.raises(ConfigError, match="unknown tracer"):
        trace_channel_units(model, x, tracer="magic")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > -1e9:  # data-dependent control flow: fx cannot trace this
            y = F.relu(y)
        return self.fc(y.mean((2, 3)))


def test_auto_falls_back_to_recorded_forward():
    model, x = DataDependent(), torch.randn(1, 3, 4, 4)
    with pytest.raises(Exception):
        trace_channel_units(model, x, tracer="fx")
    with pytest.warns(PruningTraceWarning, match="recorded a real forward"):
        specs = trace_channel_units(model, x, tracer="auto")
    unit = unit_of(specs, "conv")
    assert not unit.fixed and ("fc", 0, 8, False, 1) in refs(unit)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121", "convnext_tiny"])
def test_fx_and_recorded_forward_agree(name):
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.get_model(name, weights=None), torch.randn(1, 3, 64, 64)
    by_fx = [(s.num_channels, refs(s), s.fixed) for s in trace_channel_units(model, x, tracer="fx")]
    recorded = [(s.num_channels, refs(s), s.fixed) for s in
                trace_channel_units(model, x, tracer="torch_function")]
    assert sorted(map(repr, by_fx)) == sorted(map(repr, recorded))


def test_resnet50_units():
    torchvision = pytest.importorskip("torchvision")
    specs = trace_channel_units(torchvision.models.resnet50(weights=None), torch.randn(1, 3, 64, 64))
    # 16 bottlenecks x 2 inner units, 4 residual streams (one per stage) and the stem output: all prunable
    assert len(prunable(specs)) == 16 * 2 + 4 + 1


class HeadsFromAnotherWidth(nn.Module):
    """MaxViT-style attention: heads merged back with the *input's* width ``x.shape[-1]``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.qkv = nn.Linear(8, 24)
        self.merge = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.proj(x)
        b, n, d = x.shape
        q, k, v = torch.chunk(self.qkv(x), 3, dim=-1)
        q, k, v = (t.reshape(b, n, 2, 4).transpose(1, 2) for t in (q, k, v))
        out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        x = x + self.merge(out.transpose(1, 2).reshape(b, n, d))
        return self.head(x.mean(1))


def test_channel_count_sizing_another_tensor_fixes_both_groups():
    specs = trace_channel_units(HeadsFromAnotherWidth(), torch.randn(2, 5, 3), tracer="fx")
    stream = unit_of(specs, "proj")
    assert stream.fixed and "sizes the output of op 'reshape'" in stream.reason
    assert unit_of(specs, "qkv").fixed


class SameWidthView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.conv(x)
        n, c = y.size(0), y.size(1)
        return self.fc(y.view(n, c, -1).mean(-1))


def test_channel_count_sizing_its_own_view_stays_prunable():
    specs = trace_channel_units(SameWidthView(), torch.randn(1, 3, 4, 4), tracer="fx")
    assert not unit_of(specs, "conv").fixed


class TrainOnlyBranch(nn.Module):
    """An auxiliary head that runs only in training mode, behind data-dependent code fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.aux = nn.Conv2d(8, 2, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > -1e9:
            y = F.relu(y)
        out = self.fc(y.mean((2, 3)))
        return (out, self.aux(y).mean((2, 3))) if self.training else out


def test_recorded_forward_sees_train_only_branches():
    model = TrainOnlyBranch().eval()
    with pytest.warns(PruningTraceWarning, match="recorded a real forward"):
        specs = trace_channel_units(model, torch.randn(2, 3, 4, 4))
    assert ("aux", 0, 8, False, 1) in refs(unit_of(specs, "conv"))
    assert not model.training


class TrainFailsOnOneSample(TrainOnlyBranch):
    """Batch norm over pooled features: a single-sample batch cannot run in train mode, so only eval is recorded."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        y = F.relu(self.conv(x))
        out = self.fc(self.bn(y.mean((2, 3))))
        return (out, self.aux(y).mean((2, 3))) if self.training else out


def test_eval_recording_reports_unreached_layers_and_keeps_what_they_read():
    with pytest.warns(PruningTraceWarning, match=r"never ran the layers \['aux'\] \(a train-mode forward failed: "
                                                 r"layer 'bn' \(BatchNorm1d\) raised ValueError"):
        specs = trace_channel_units(TrainFailsOnOneSample(), torch.randn(1, 3, 2, 2), tracer="torch_function")
    assert all("aux" not in {r.name for r in s.output_related + s.input_related} for s in specs)
    conv = unit_of(specs, "conv")
    assert conv.fixed and "does not reach (aux)" in conv.reason  # aux reads it in train mode


def test_tracing_leaves_buffers_unchanged():
    model = TrainFailsOnOneSample()
    before = {n: b.clone() for n, b in model.named_buffers()}
    trace_channel_units(model, torch.randn(4, 3, 2, 2), tracer="torch_function")
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())


class LiteralWidthReshape(nn.Module):
    """ViT-style: the patch embedding is reshaped with its width written as a number (``self.hidden_dim``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.other = nn.Conv2d(3, 8, 2, stride=2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        n = x.shape[0]
        tokens = self.embed(x).reshape(n, 8, -1).permute(0, 2, 1)
        other = self.other(x)
        other = other.reshape(n, other.shape[1], -1).permute(0, 2, 1)
        return self.fc(tokens.mean(1) + 0 * other.mean(1))


@pytest.mark.parametrize("tracer", ["fx", "torch_function"])
def test_reshape_to_a_literal_channel_count_fixes_the_group(tracer):
    with pytest.warns(PruningTraceWarning, match="fixes the channel count to 8"):
        specs = trace_channel_units(LiteralWidthReshape(), torch.randn(2, 3, 4, 4), tracer=tracer)
    assert unit_of(specs, "embed").fixed


class FunctionalNormWithoutAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(F.layer_norm(self.proj(x), (8,)))


def test_unknown_op_given_the_channel_count_fixes_the_group():
    with pytest.warns(PruningTraceWarning, match="equals the channel count 8"):
        specs = trace_channel_units(FunctionalNormWithoutAffine(), torch.randn(2, 3))
    assert unit_of(specs, "proj").fixed
