"""Compact training mode (pyprune.ops.compact): the same training as gather mode, on compact tensors.

Equality is checked at fp32 with the same seed and data: a compact step and a gather step compute the same numbers
for the kept channels (forward on identical compact weights, elementwise optimizer updates), so the tolerance is
1e-6 (relative and absolute); in practice the results are bitwise equal. Pruned channels are set aside untouched in
compact mode, while gather mode lets gradient-free optimizer terms (momentum, weight decay) keep moving them: the
equality tests therefore re-grow channels that had no optimizer history, and ``test_dropped_channels_*`` checks the
compact rule itself.
"""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import batches, logits
from helpers import prepared_zoo_net as prepared
from models import ZooNet
from pyprune.errors import ConfigError
from pyprune.ops import CompactTraining, DynamicChannelMixin, channel_parameters, compact_training, to_dynamic
from pyprune.ops.compact import release_compact
from pyprune.ops.compact_state import gather_slice

EQUAL = dict(rtol=1e-6, atol=1e-6)


def train(model, optimizer, data):
    model.train()
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_same_subnet(compact_pair, gather_pair, x):
    """Same outputs and the same exported (kept-channel) weights and statistics."""
    (model, mutator), (reference, reference_mutator) = compact_pair, gather_pair
    torch.testing.assert_close(logits(model, x), logits(reference, x), **EQUAL)
    ours, theirs = mutator.export(model).state_dict(), reference_mutator.export(reference).state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], **EQUAL, msg=key)


OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0),
}


@pytest.mark.parametrize("optimizer_name, switch", [("sgd_momentum", "paused"), ("adamw", "direct")])
def test_training_equals_gather_mode_across_a_switch_and_regrowth(optimizer_name, switch):
    compact_pair, gather_pair = prepared(), prepared()
    (model, mutator), (reference, reference_mutator) = compact_pair, gather_pair
    for m in (mutator, reference_mutator):
        m.set_global_ratio(0.5)
    optimizer, reference_optimizer = OPTIMIZERS[optimizer_name](model.parameters()), \
        OPTIMIZERS[optimizer_name](reference.parameters())
    data, probe = batches(6), batches(1, seed=7)[0][0]
    first = [u.current_index.clone() for u in mutator.mutable_units]
    with compact_training(model, optimizer) as session:
        assert session.layers and session.compact_parameters < sum(p.numel() for p in reference.parameters())
        train(model, optimizer, data[:3])
        train(reference, reference_optimizer, data[:3])
        assert_same_subnet(compact_pair, gather_pair, probe)
        if switch == "paused":
            with session.paused():
                mutator.set_global_ratio(0.75)
        else:  # straight through the mutator: each compact op writes back and re-compacts itself
            mutator.set_global_ratio(0.75)
        reference_mutator.set_global_ratio(0.75)
        regrown = [set(u.current_index.tolist()) - set(old.tolist()) for u, old in zip(mutator.mutable_units, first)]
        assert any(regrown), "the switch must bring back channels that were pruned"
        train(model, optimizer, data[3:])
        train(reference, reference_optimizer, data[3:])
        assert_same_subnet(compact_pair, gather_pair, probe)
    for ours, theirs in zip(model.state_dict().values(), reference.state_dict().values()):
        if isinstance(ours, torch.Tensor):  # kept channels trained alike; the re-grown ones had no history
            assert ours.shape == theirs.shape


def test_dropped_channels_keep_value_and_optimizer_state_until_regrown():
    (model, mutator), (reference, reference_mutator) = prepared("SequentialMutableChannelUnit"), \
        prepared("SequentialMutableChannelUnit")
    make = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2)  # noqa: E731
    optimizer, reference_optimizer = make(model.parameters()), make(reference.parameters())
    data = batches(6)
    session = compact_training(model, optimizer)
    train(model, optimizer, data[:2])
    with session.paused():
        at_drop = copy.deepcopy(model.stem.weight.detach()), copy.deepcopy(optimizer.state[model.stem.weight])
        mutator.set_global_ratio(0.5)
    dropped = torch.ones(16, dtype=torch.bool)
    dropped[next(u for u in mutator.mutable_units if u.name.startswith("stem")).current_index] = False
    train(model, optimizer, data[2:4])
    with session.paused():  # full size inside: the dropped channels are exactly as they were dropped
        torch.testing.assert_close(model.stem.weight[dropped], at_drop[0][dropped], rtol=0, atol=0)
        torch.testing.assert_close(optimizer.state[model.stem.weight]["momentum_buffer"][dropped],
                                   at_drop[1]["momentum_buffer"][dropped], rtol=0, atol=0)
        assert not torch.equal(model.stem.weight[~dropped], at_drop[0][~dropped])
        mutator.set_global_ratio(1.0)
    assert model.stem.weight.shape == (16, 3, 3, 3)
    session.exit()
    # gather mode, same schedule: momentum and weight decay keep moving the pruned channels
    train(reference, reference_optimizer, data[:2])
    reference_mutator.set_global_ratio(0.5)
    train(reference, reference_optimizer, data[2:4])
    assert not torch.equal(reference.stem.weight.detach()[dropped], at_drop[0][dropped])


def test_state_dict_round_trip_into_a_fresh_model_and_back():
    model, mutator = prepared()
    mutator.set_global_ratio(0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = batches(1, seed=7)[0][0]
    fresh, _ = prepared()
    with compact_training(model, optimizer):
        train(model, optimizer, batches(3))
        state = model.state_dict()
        expected = {k: v for k, v in fresh.state_dict().items()}
        assert list(state) == list(expected)
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert value.shape == expected[key].shape, key
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        fresh.load_state_dict(loaded)
        torch.testing.assert_close(logits(fresh, probe), logits(model, probe), rtol=0, atol=0)
        # back into the compact model itself (and with another selection): it stays compact, at the new selection
        model.load_state_dict(loaded)
        assert model.stem.weight.shape[0] < 16
        torch.testing.assert_close(logits(model, probe), logits(fresh, probe), rtol=0, atol=0)
        other, other_mutator = prepared()
        other_mutator.set_global_ratio(0.75)
        model.load_state_dict(other.state_dict())
        assert model.stem.weight.shape == (12, 3, 3, 3)
        torch.testing.assert_close(logits(model, probe), logits(other, probe), rtol=0, atol=0)


def test_optimizer_state_dict_is_full_size_and_resumes_exactly():
    def run(steps, resume_from=None):
        model, mutator = prepared()
        mutator.set_global_ratio(0.5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        session = compact_training(model, optimizer)
        if resume_from is not None:
            model.load_state_dict(resume_from[0])
            optimizer.load_state_dict(resume_from[1])
        train(model, optimizer, steps)
        return model, optimizer, session
    data = batches(6)
    model, optimizer, session = run(data[:3])
    optimizer_state = optimizer.state_dict()
    full_shapes = [tuple(p.shape) for p in prepared()[0].parameters()]
    for index, state in optimizer_state["state"].items():
        assert tuple(state["exp_avg"].shape) == full_shapes[index]
        assert state["step"].dim() == 0
    checkpoint = copy.deepcopy((model.state_dict(), optimizer_state))
    train(model, optimizer, data[3:])
    resumed, _, _ = run(data[3:], resume_from=checkpoint)
    for ours, theirs in zip(model.state_dict().values(), resumed.state_dict().values()):
        if isinstance(ours, torch.Tensor):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    session.exit()


def test_export_summary_and_deep_copies_in_compact_mode():
    model, mutator = prepared()
    mutator.set_global_ratio(0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = batches(1, seed=7)[0][0]
    session = compact_training(model, optimizer)
    train(model, optimizer, batches(2))
    exported = mutator.export(model)
    assert not any(isinstance(m, DynamicChannelMixin) for m in exported.modules())
    torch.testing.assert_close(logits(exported, probe), logits(model, probe), rtol=0, atol=0)
    summary = mutator.summary(model, probe)
    assert summary is not None and model.stem.weight.shape[0] == 8  # the original stays compact
    clone = copy.deepcopy(model)
    torch.testing.assert_close(logits(clone, probe), logits(model, probe), rtol=0, atol=0)
    release_compact(clone)
    assert clone.stem.weight.shape == (16, 3, 3, 3)
    torch.testing.assert_close(logits(clone, probe), logits(model, probe), rtol=0, atol=0)
    session.exit()


def test_batchnorm_statistics_follow_the_active_channels_only():
    (model, mutator), (reference, reference_mutator) = prepared(), prepared()
    initial = model.bn.running_mean.clone()
    for m in (mutator, reference_mutator):
        m.set_global_ratio(0.5)
    kept = next(u for u in mutator.mutable_units if u.name.startswith("stem")).current_index
    dropped = torch.ones(16, dtype=torch.bool)
    dropped[kept] = False
    optimizer, reference_optimizer = torch.optim.SGD(model.parameters(), lr=0.05), \
        torch.optim.SGD(reference.parameters(), lr=0.05)
    data = batches(3)
    with compact_training(model, optimizer):
        assert model.bn.running_mean.shape == (8,) and model.bn1d.running_var.shape == (10,)
        train(model, optimizer, data)
    train(reference, reference_optimizer, data)
    for name in ("bn", "bn2", "bn1d"):
        ours, theirs = getattr(model, name), getattr(reference, name)
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, stat), getattr(theirs, stat), **EQUAL)
    assert torch.equal(model.bn.running_mean[dropped], initial[dropped])
    assert not torch.equal(model.bn.running_mean[kept], initial[kept])


def test_conversions_keep_compact_mode():
    model, mutator = prepared()
    mutator.set_global_ratio(0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = batches(1, seed=7)[0][0]
    with compact_training(model, optimizer):
        expected = logits(model, probe).double()
        model.double()
        assert model.stem.weight.dtype == torch.float64 and model.stem.weight.shape[0] == 8
        assert model.state_dict()["stem.weight"].dtype == torch.float64
        torch.testing.assert_close(logits(model, probe.double()), expected, rtol=1e-5, atol=1e-5)
    assert model.stem.weight.shape == (16, 3, 3, 3) and model.stem.weight.dtype == torch.float64


# ---------------------------------------------------------------------------------------- every layer kind
def _swin(version):
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
    cls = ShiftedWindowAttention if version == 1 else ShiftedWindowAttentionV2
    return cls(16, [2, 2], [1, 1], 4), lambda k: torch.randn(2, 4, 4, k)


class _ChannelsFirstLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


LAYERS = {
    "conv": lambda: (nn.Conv2d(8, 6, 3, padding=1), lambda k: torch.randn(2, k, 5, 5)),
    "conv_grouped": lambda: (nn.Conv2d(8, 12, 3, padding=1, groups=4), lambda k: torch.randn(2, k, 5, 5)),
    "conv_depthwise": lambda: (nn.Conv2d(8, 8, 3, padding=1, groups=8), lambda k: torch.randn(2, k, 5, 5)),
    "linear": lambda: (nn.Linear(10, 6), lambda k: torch.randn(3, k)),
    "bn1d": lambda: (nn.BatchNorm1d(8), lambda k: torch.randn(6, k)),
    "bn2d": lambda: (nn.BatchNorm2d(8), lambda k: torch.randn(4, k, 3, 3)),
    "layernorm": lambda: (nn.LayerNorm(8), lambda k: torch.randn(2, 3, k)),
    "layernorm_channels_first": lambda: (_ChannelsFirstLayerNorm(8), lambda k: torch.randn(2, k, 3, 3)),
    "groupnorm": lambda: (nn.GroupNorm(4, 12), lambda k: torch.randn(2, k, 3, 3)),
    "attention": lambda: (nn.MultiheadAttention(16, 4, add_bias_kv=True), lambda k: torch.randn(5, 2, k)),
    "swin_v1": lambda: _swin(1),
    "swin_v2": lambda: _swin(2),
}


def _balanced(count, groups, generator):
    """A random selection keeping half of each of ``groups`` equal blocks (sorted)."""
    block = count // groups
    picks = [torch.randperm(block, generator=generator)[:max(1, block // 2)] + g * block for g in range(groups)]
    return torch.cat(picks).sort().values


@pytest.mark.parametrize("kind", list(LAYERS))
def test_every_layer_kind_trains_compact_like_gather_mode(kind):
    torch.manual_seed(0)
    layer, make_input = LAYERS[kind]()
    with torch.no_grad():
        for tensor in layer.parameters():
            tensor.normal_()
    op = to_dynamic(layer)
    generator = torch.Generator().manual_seed(3)
    out_count, in_count = op._full_channels()
    op.set_out_channels(_balanced(out_count, op._groups_of(True), generator))
    if not op._one_selection():
        op.set_in_channels(_balanced(in_count, op._groups_of(False), generator))
    layout = op._compact_layout()
    with torch.no_grad():  # a graph alive across the compaction would keep the weight's old AccumulateGrad node
        gathered = dict(zip(op._channel_tensors, op._gather_compact()))
    assert layout and all(torch.equal(gather_slice(p, p.tensor.detach()), gathered[p.name]) for p in layout)

    holder, reference = nn.Sequential(op), copy.deepcopy(nn.Sequential(op))
    before = copy.deepcopy(holder.state_dict())
    x = make_input(op.active_in_channels)
    forward = (lambda m: m[0](x, x, x)[0]) if kind == "attention" else (lambda m: m(x))
    optimizer, reference_optimizer = torch.optim.Adam(holder.parameters(), lr=0.1), \
        torch.optim.Adam(reference.parameters(), lr=0.1)
    with compact_training(holder, optimizer):
        assert all(p.tensor.shape == gathered[p.name].shape for p in layout)
        for model, opt in ((holder, optimizer), (reference, reference_optimizer)):
            for _ in range(2):
                opt.zero_grad()
                forward(model).square().mean().backward()
                opt.step()
        torch.testing.assert_close(forward(holder), forward(reference), **EQUAL)
        exported = op.export()
    torch.testing.assert_close(holder.state_dict()[f"0.{layout[0].name}"], reference.state_dict()[
        f"0.{layout[0].name}"], **EQUAL)
    assert type(exported) is not type(op)
    for key, value in holder.state_dict().items():  # back to full size; the pruned channels never moved
        if isinstance(value, torch.Tensor):
            assert value.shape == before[key].shape, key


def test_channel_parameters_stay_in_gather_mode():
    """A ChannelParameter (ConvNeXt's layer_scale, ViT's class token) is a few values per model, served by its owner's
    attribute lookup (``index_select``): it stays full size, in gather mode, and trains as before."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.layer_scale = nn.Parameter(torch.rand(8, 1, 1))
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            x = self.conv1(x)
            return self.head((x + self.conv2(F.relu(x)) * self.layer_scale).mean((2, 3)))

    (model, mutator), (reference, reference_mutator) = prepared(model_type=Scaled), prepared(model_type=Scaled)
    assert [slot.pyprune_name for slot in channel_parameters(model)] == ["layer_scale"]
    for m in (mutator, reference_mutator):
        m.set_global_ratio(0.5)
    optimizer, reference_optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), \
        torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    data = batches(3)
    with compact_training(model, optimizer) as session:
        assert "conv2" in session.layers and model._parameters["layer_scale"].shape == (8, 1, 1)
        train(model, optimizer, data)
        train(reference, reference_optimizer, data)
        torch.testing.assert_close(logits(model, data[0][0]), logits(reference, data[0][0]), **EQUAL)


# ------------------------------------------------------------------------------------------------------ bad use
def test_entering_an_unprepared_model_names_a_layer_and_changes_nothing():
    torch.manual_seed(0)
    model = ZooNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"not prepared.*'stem' \(Conv2d\).*prepare_from_supernet"):
        compact_training(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_optimizer_of_another_model_is_refused():
    model, mutator = prepared()
    mutator.set_global_ratio(0.5)
    stale = torch.optim.SGD(ZooNet().parameters(), lr=0.1)  # e.g. built before the model was rebuilt
    with pytest.raises(ConfigError, match=r"optimizer 0 \(SGD\) steps none of the model's parameters.*'stem.weight'"):
        compact_training(model, stale)
    assert model.stem.weight.shape == (16, 3, 3, 3) and model.stem.tensor_provider.source is None


def test_an_optimizer_not_given_to_the_session_cannot_step_compact_parameters():
    model, mutator = prepared()
    mutator.set_global_ratio(0.5)
    known, unknown = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)
    with compact_training(model, known):
        F.cross_entropy(model(batches(1)[0][0]), batches(1)[0][1]).backward()
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ConfigError, match=r"SGD.step\(\): parameter stem.weight is in compact training mode"):
            unknown.step()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))
        known.step()  # the session's own optimizer steps


def test_state_of_another_shape_and_a_second_session_are_refused():
    model, mutator = prepared()
    mutator.set_global_ratio(0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.state[model.fc.weight]["factored"] = torch.zeros(20)
    with pytest.raises(ConfigError, match=r"state 'factored' of shape \[20\] for fc.weight \[20, 32\]"):
        compact_training(model, optimizer)
    assert model.fc.weight.shape == (20, 32) and model.fc.tensor_provider.source is None
    del optimizer.state[model.fc.weight]["factored"]
    with compact_training(model, optimizer):
        with pytest.raises(ConfigError, match=r"layer 'stem' \(DynamicConv2d\) is already in compact training mode"):
            CompactTraining(model, optimizer).enter()
        assert model.stem.weight.shape == (8, 3, 3, 3)


def test_layers_keeping_other_channels_of_a_shared_tensor_stay_in_gather_mode():
    first, second = to_dynamic(nn.Linear(6, 6)), to_dynamic(nn.Linear(6, 6))
    second.weight = first.weight  # tied weights: one compact copy could not serve two selections
    first.set_out_channels(3)
    second.set_out_channels(2)
    for layer in (first, second):
        layer.set_in_channels(3)
    model = nn.Sequential(first, second)
    with pytest.warns(UserWarning, match=r"0 shares tensors with \['1'\], which keep other channels of them; these "
                                         r"layers stay in gather mode"):
        session = compact_training(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert session.layers == [] and first.weight.shape == (6, 6)
    x = torch.randn(2, 3)
    torch.testing.assert_close(model(x), second(first(x)))
    session.exit()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compact_steps_and_switches_do_not_sync_on_cuda():
    model, mutator = prepared()
    mutator.set_global_ratio(0.5)
    model.cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = (t.cuda() for t in batches(1)[0])
    train(model, optimizer, [(x, y)])  # momentum state exists before the first compaction
    session = CompactTraining(model, optimizer)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        session.enter()
        train(model, optimizer, [(x, y)] * 2)
        session.refresh()
        model.state_dict()
        optimizer.state_dict()
        session.exit()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert model.stem.weight.shape == (16, 3, 3, 3)


def test_taylor_importance_in_compact_mode_names_the_layer_and_works_when_paused():
    """Compact gradients do not line up with a unit's full channel ranges: Taylor refuses them clearly, and inside
    ``paused()`` (full-size tensors and gradients) it accumulates as usual."""
    from pyprune.errors import ChannelSelectionError

    model, mutator = prepared("TaylorMutableChannelUnit")
    mutator.set_global_ratio(0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    with compact_training(model, optimizer) as session:
        model.train()
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(ChannelSelectionError, match=r"unit .*layer '.*' is in compact training mode.*paused"):
            mutator.update_importance()
        optimizer.zero_grad()
        with session.paused():
            F.cross_entropy(model(x), y).backward()
            mutator.update_importance()
    assert all(u.num_updates == 1 for u in mutator.mutable_units)
