"""A parse that did not see a layer must not prune what that layer reads or feeds.

The example input can be too small for a train-only branch (Inception's aux head at 224 px): fx's shape pass fails
there, the recorded forward runs in eval mode and never reaches the branch. The groups around those layers must stay
whole, with a warning naming them and an input that does reach them; strict mode refuses.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.errors import ConfigError, UntraceableOpError
from pyprune.mutators import ChannelMutator
from pyprune.tracing import PruningTraceWarning, trace_channel_units


def unit_with(specs, name, is_output=True):
    return next(s for s in specs if any(r.name == name and r.is_output_channel == is_output
                                        for r in s.output_related + s.input_related))


class SmallAux(nn.Module):
    """A train-only head on the body's output that needs inputs of 12 px or more (a 3x3 conv after a /4 pool)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 16, 3, padding=1)
        self.aux = nn.Conv2d(16, 4, 3)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = F.relu(self.body(F.relu(self.bn(self.stem(x)))))
        out = self.fc(y.mean((2, 3)))
        if self.training:
            return out, self.aux(F.avg_pool2d(y, 4)).mean((2, 3))
        return out


def test_unreached_branch_keeps_what_it_reads_and_names_an_input_that_reaches_it():
    with pytest.warns(PruningTraceWarning) as caught:
        specs = trace_channel_units(SmallAux(), torch.randn(1, 3, 8, 8))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "eval-mode graph never ran the layers ['aux']" in messages[0]
    assert "in train mode layer 'aux' (Conv2d) raised RuntimeError" in messages[0]  # why
    assert "(1, 3, 16, 16) runs every layer" in messages[0]
    body = unit_with(specs, "body")
    assert body.fixed and "does not reach (aux)" in body.reason
    assert not unit_with(specs, "stem").fixed  # what the branch does not touch is still pruned


def test_default_parse_then_export_runs_in_train_mode():
    model = SmallAux()
    mutator = ChannelMutator(parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    with pytest.warns(PruningTraceWarning, match="never ran the layers"):
        mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(0.5)
    pruned = mutator.export(model).train()
    assert pruned.stem.out_channels == 4 and pruned.body.out_channels == 16
    out, aux = pruned(torch.randn(2, 3, 16, 16))
    (out.sum() + aux.sum()).backward()


def test_an_input_that_reaches_the_branch_prunes_it():
    specs = trace_channel_units(SmallAux(), torch.randn(1, 3, 16, 16))
    body = unit_with(specs, "body")
    assert not body.fixed and "aux" in {r.name for r in body.input_related}


def test_strict_refuses_naming_the_layers_and_an_input():
    with pytest.raises(UntraceableOpError, match=r"never ran the layers \['aux'\].*\(1, 3, 16, 16\)"):
        trace_channel_units(SmallAux(), torch.randn(1, 3, 8, 8), strict=True)


class SmallSide(nn.Module):
    """A train-only side branch whose output is added back into the stream the head reads (it needs 5 px)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.side = nn.Conv2d(3, 8, 5)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        if self.training:
            y = y + F.adaptive_avg_pool2d(self.side(x), y.shape[-2:])
        return self.head(y).mean((2, 3))


def test_groups_an_unreached_layer_feeds_are_kept_whole():
    with pytest.warns(PruningTraceWarning, match=r"never ran the layers \['side'\]"):
        specs = trace_channel_units(SmallSide(), torch.randn(1, 3, 4, 4))
    stream = unit_with(specs, "stem")
    assert stream.fixed and "does not reach (side)" in stream.reason


class Untraceable(SmallAux):
    """Data-dependent control flow (fx cannot trace it) around the same too-small train-only head."""

    def forward(self, x):
        y = F.relu(self.body(F.relu(self.bn(self.stem(x)))))
        if y.sum() > -1e9:
            y = y * 1.0
        out = self.fc(y.mean((2, 3)))
        return (out, self.aux(F.avg_pool2d(y, 4)).mean((2, 3))) if self.training else out


def test_without_fx_the_warning_says_what_they_read_is_unknown():
    with pytest.warns(PruningTraceWarning) as caught:
        trace_channel_units(Untraceable(), torch.randn(1, 3, 8, 8))
    messages = [str(w.message) for w in caught]
    assert any("recorded forward never ran the layers ['aux']" in m and "what they read is unknown" in m
               and "layer 'aux' (Conv2d) raised RuntimeError" in m for m in messages)


class WithUnused(SmallAux):
    def __init__(self):
        super().__init__()
        self.unused = nn.Conv2d(16, 16, 1)  # defined, never called: nothing to analyse


def test_a_layer_the_code_never_calls_is_not_reported():
    with pytest.warns() as caught:
        trace_channel_units(WithUnused(), torch.randn(1, 3, 8, 8))
    assert not any("unused" in str(w.message) for w in caught)


@pytest.mark.parametrize("tracer", ["auto", "fx", "torch_function"])
def test_a_model_that_cannot_run_at_all_is_refused_with_one_message(tracer):
    model = nn.Sequential(nn.Conv2d(3, 8, 5), nn.Conv2d(8, 4, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = (r"input \(tensor of shape \(1, 3, 2, 2\), dtype float32\): layer '0' \(Conv2d\) raised RuntimeError: "
                r"Calculated padded input")
    if tracer != "torch_function":  # the symbolic graph can be run at other sizes
        expected += r".*; an example input of shape \(1, 3, 8, 8\) runs every layer"
    with pytest.raises(ConfigError, match=expected):
        trace_channel_units(model, torch.randn(1, 3, 2, 2), tracer=tracer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("size", [16, 8])  # fx's shape pass; the recorded forward
@pytest.mark.filterwarnings("ignore::pyprune.tracing.PruningTraceWarning")
def test_tracing_keeps_each_module_training_flag(size):
    model = SmallAux().train()
    model.bn.eval()  # e.g. frozen batch norm statistics
    trace_channel_units(model, torch.randn(1, 3, size, size))
    assert model.training and model.stem.training and not model.bn.training


@pytest.mark.slow
def test_inception_v3_default_demo_input_exports_a_model_that_trains():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    mutator = ChannelMutator()  # demo input (1, 3, 224, 224): too small for the aux head
    with pytest.warns(PruningTraceWarning, match=r"never ran the layers \['AuxLogits.conv0.conv'.*448, 448\)"):
        mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(0.5)
    pruned = mutator.export(model).train()
    with torch.no_grad():
        out, aux = pruned(torch.randn(2, 3, 299, 299))
    assert out.shape == aux.shape == (2, 1000)
