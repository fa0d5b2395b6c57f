"""The rest of mmrazor's pruning API: MutableChannelContainer, dump_chosen / fix_chosen on every mutable channel,
the predefined dynamic ops of one-shot supernets (BigNasConv2d, OFAConv2d, DynamicConv2dAdaptivePadding,
DynamicSequential, DynamicPatchEmbed, DynamicRelativePosition2D)
and ItePruneAlgorithm's epoch-based step_freq. Dynamic forwards are compared with the exported plain modules and with
a reference computed from the full weights (atol 1e-5, float32)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.compat.mmrazor import (BigNasConv2d, ChannelMutator, DynamicBatchNorm2d, DynamicConv2d,
                                    DynamicConv2dAdaptivePadding, DynamicLinear,
                                    DynamicPatchEmbed, DynamicRelativePosition2D, DynamicSequential, ItePruneAlgorithm,
                                    ItePruneConfigManager, MutableChannelContainer, OFAConv2d, OneShotMutableChannel,
                                    OneShotMutableValue, SimpleMutableChannel, SquentialMutableChannel)
from pyprune.utils.adaptive_padding_conv import Conv2dAdaptivePadding
from pyprune.utils.patch_embed import PatchEmbed
from pyprune.utils.relative_position import RelativePosition2D
from pyprune.errors import ChannelSelectionError, ConfigError
from pyprune.ops import DynamicChannelMixin
from pyprune.units.mutable_channel import FixedTwiceError

from compat.models import SingleLineModel

ATOL = 1e-5
STREAM = "net.0_(0, 8)_8"  # SingleLineModel: conv 3->8 / bn / conv 8->16
NUMBER_MUTATOR = dict(type="ChannelMutator", channel_unit_cfg=dict(type="SequentialMutableChannelUnit"),
                      parse_cfg=dict(type="ChannelAnalyzer", demo_input=(1, 3, 16, 16), tracer_type="FxTracer"))


def _close(a, b):
    return torch.allclose(a, b, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- the container
def test_container_mask_is_the_ranges_concatenated_and_bad_ranges_are_refused():
    container = MutableChannelContainer(10)
    first, last = SquentialMutableChannel(4), SquentialMutableChannel(3)
    container.register_mutable(last, 7, 10)
    container.register_mutable(first, 0, 4)
    first.current_choice, last.current_choice = 1, 2
    # [4, 7) is registered by nobody: all kept, as mmrazor fills it with a full channel
    assert container.current_mask.tolist() == [True, False, False, False, True, True, True, True, True, False]
    assert container.activated_channels == 6
    assert [(s, e) for s, e, _ in container.ranges()] == [(0, 4), (7, 10)]
    container.register_mutable(first, 0, 4)  # the same channel on the same range again: a no-op
    for mutable, start, end, match in ((SquentialMutableChannel(2), 3, 5, "overlaps"),
                                       (SquentialMutableChannel(2), 4, 7, "3 channels"),
                                       (SquentialMutableChannel(2), 9, 11, "0 <= start")):
        with pytest.raises(ConfigError, match=match):
            container.register_mutable(mutable, start, end)
    assert len(container.mutable_channels) == 2  # nothing registered by the refusals
    with pytest.raises(NotImplementedError, match="cannot be set directly"):
        container.current_choice = torch.ones(10, dtype=torch.bool)
    conv = DynamicConv2d(3, 8, 1)
    with pytest.raises(ConfigError, match="no MutableChannelContainer"):
        MutableChannelContainer.register_mutable_channel_to_module(conv, SquentialMutableChannel(8), True)


def test_hand_built_layers_with_containers_run_at_the_concatenated_mask():
    torch.manual_seed(0)
    conv, linear = DynamicConv2d(3, 16, 3, padding=1), DynamicLinear(16, 5)
    conv.register_mutable_attr("out_channels", MutableChannelContainer(16))
    linear.register_mutable_attr("in_features", MutableChannelContainer(16))
    low, high = SquentialMutableChannel(8), SquentialMutableChannel(8)
    for module, is_output in ((conv, True), (linear, False)):
        MutableChannelContainer.register_mutable_channel_to_module(module, low, is_output, 0, 8)
        MutableChannelContainer.register_mutable_channel_to_module(module, high, is_output, 8)  # end: 8 + width
    low.current_choice, high.current_choice = 3, 5
    kept = torch.tensor([0, 1, 2, 8, 9, 10, 11, 12])
    x = torch.rand(2, 3, 6, 6)
    hidden = conv(x)
    reference = F.conv2d(x, conv.weight[kept], conv.bias[kept], padding=1)
    assert hidden.shape == (2, 8, 6, 6) and _close(hidden, reference)
    assert _close(conv.export()(x), hidden)
    pooled = hidden.mean((2, 3))
    assert _close(linear(pooled), F.linear(pooled, linear.weight[:, kept], linear.bias))
    assert linear.export().in_features == 8
    conv.set_out_channels(4)  # someone else sets the layer: from then on it keeps what it is given
    low.current_choice = 8
    assert conv.active_out_channels == 4 and not conv.follows_mutables
    assert linear.active_in_channels == 13 and linear.follows_mutables


def test_a_deep_copied_hand_built_model_follows_its_own_channels():
    model = nn.Sequential(DynamicConv2d(3, 8, 1), DynamicConv2d(8, 4, 1))
    width = SquentialMutableChannel(8)
    model.width = width
    model[0].register_mutable_attr("out_channels", width)
    model[1].register_mutable_attr("in_channels", width)
    copied = copy.deepcopy(model)
    copied.width.current_choice = 2
    assert (copied[0].active_out_channels, copied[1].active_in_channels) == (2, 2)
    assert (model[0].active_out_channels, model[1].active_in_channels) == (8, 8) and width.current_choice == 8
    width.current_choice = 5
    assert model[0].active_out_channels == 5 and copied[0].active_out_channels == 2


class ContainerModel(nn.Module):
    """mmrazor's way of building a supernet by hand: a container on every side, two channels sharing conv1's
    output (ranges [0, 8) and [8, 16)), read by the norm and by conv2."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = DynamicConv2d(3, 16, 3, padding=1), DynamicBatchNorm2d(16)
        self.conv2, self.head = DynamicConv2d(16, 8, 3, padding=1), DynamicLinear(8, 4)
        for module, attr, width in ((self.conv1, "out_channels", 16), (self.bn1, "num_features", 16),
                                    (self.conv2, "in_channels", 16), (self.conv2, "out_channels", 8),
                                    (self.head, "in_features", 8)):
            module.register_mutable_attr(attr, MutableChannelContainer(width))
        self.a, self.b = OneShotMutableChannel(8, [2, 4, 8]), OneShotMutableChannel(8, [4, 8])
        self.c = OneShotMutableChannel(8, [2, 8])
        for module, is_output in ((self.conv1, True), (self.bn1, True), (self.conv2, False)):
            MutableChannelContainer.register_mutable_channel_to_module(module, self.a, is_output, 0, 8)
            MutableChannelContainer.register_mutable_channel_to_module(module, self.b, is_output, 8, 16)
        MutableChannelContainer.register_mutable_channel_to_module(self.conv2, self.c, True, 0, 8)
        MutableChannelContainer.register_mutable_channel_to_module(self.head, self.c, False, 0, 8)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def test_predefined_parsing_gives_each_container_channel_its_ranges():
    torch.manual_seed(0)
    model = ContainerModel().eval()
    mutator = ChannelMutator(dict(type="OneShotMutableChannelUnit", default_args=dict(unit_predefined=False)),
                             parse_cfg=dict(type="Predefined"))
    mutator.prepare_from_supernet(model)
    units = {tuple(sorted((r.name, r.start, r.end) for r in u.output_related)): u for u in mutator.mutable_units}
    assert set(units) == {(("bn1", 0, 8), ("conv1", 0, 8)), (("bn1", 8, 16), ("conv1", 8, 16)),
                          (("conv2", 0, 8),)}
    unit_a, unit_b, unit_c = (units[key] for key in sorted(units))
    assert [r.start for r in unit_b.input_related] == [8] and unit_a.candidate_choices == [2, 4, 8]
    mutator.set_choices({unit_a.name: 2, unit_b.name: 4, unit_c.name: 2})
    assert (model.a.current_choice, model.b.current_choice, model.c.current_choice) == (2, 4, 2)
    assert model.conv1.get_mutable_attr("out_channels").activated_channels == 6  # the containers follow too
    x = torch.rand(2, 3, 8, 8)
    small = mutator.export(model)
    assert (small.conv1.out_channels, small.conv2.in_channels, small.head.in_features) == (6, 6, 2)
    assert not any(isinstance(m, DynamicChannelMixin) for m in small.modules())
    assert _close(model(x), small(x))


# ------------------------------------------------------------------------------------ dump_chosen / fix_chosen
def test_dump_and_fix_chosen_on_every_mutable_channel_kind():
    simple = SimpleMutableChannel(4)
    simple.current_choice = torch.tensor([True, False, True, True])
    sequential, one_shot = SquentialMutableChannel(8, choice_mode="ratio"), OneShotMutableChannel(8, [2, 6, 8])
    sequential.current_choice, one_shot.current_choice = 0.25, 6
    container = MutableChannelContainer(12)
    container.register_mutable(simple, 0, 4)
    container.register_mutable(sequential, 4, 12)
    expanded = one_shot.expand_mutable_channel(2)
    # mmrazor's shapes: the activated channel count and the full width
    assert simple.dump_chosen() == (3, {"max_channels": 4})
    assert sequential.dump_chosen().chosen == 2 and sequential.dump_chosen().meta == {"max_channels": 8}
    assert one_shot.dump_chosen() == (6, {"max_channels": 8})
    assert container.dump_chosen() == (5, {"max_channels": 12})
    with pytest.warns(UserWarning, match="depends on its source"):
        dumped = expanded.dump_chosen()
    assert dumped.meta is None and dumped.chosen.tolist() == [True] * 12 + [False] * 4
    assert expanded.activated_channels == 12 and not expanded.is_fixed

    one_shot.fix_chosen()  # sequential kinds: the current choice by default
    assert one_shot.is_fixed and one_shot.current_choice == 6 and expanded.is_fixed
    simple.fix_chosen(torch.tensor([True, True, False, False]))
    assert simple.activated_channels == 2
    container.fix_chosen()
    with pytest.raises(ChannelSelectionError, match="cannot set a choice"):
        MutableChannelContainer(4).fix_chosen(torch.ones(4))
    for mutable in (simple, one_shot, container):
        with pytest.raises(FixedTwiceError, match="fixed already"):
            mutable.fix_chosen()
    # mmrazor raises AttributeError (base channel) or fails an assert (sequential channel): both catch it
    assert issubclass(FixedTwiceError, AttributeError) and issubclass(FixedTwiceError, AssertionError)
    with pytest.raises(ChannelSelectionError, match="candidates"):
        OneShotMutableChannel(8, [2, 8]).fix_chosen(3)
    with pytest.warns(UserWarning, match="no effect"):
        expanded.fix_chosen()
    with pytest.raises(RuntimeError, match="cannot be set"):
        expanded.current_choice = 4


# ------------------------------------------------------------------------------------------- predefined ops
def _kernel_crop(weight, k):
    start = weight.shape[-1] // 2 - k // 2
    return weight[:, :, start:start + k, start:start + k]


@pytest.mark.parametrize("depthwise", [False, True])
def test_bignas_conv_runs_the_centre_of_its_kernel_and_exports_it(depthwise):
    torch.manual_seed(0)
    groups = 8 if depthwise else 1
    conv = BigNasConv2d(8, 8, 7, padding=3, groups=groups)
    kernel, channels = OneShotMutableValue([3, 5, 7]), OneShotMutableChannel(8, [4, 8])
    conv.register_mutable_attr("kernel_size", kernel)
    conv.register_mutable_attr("out_channels", channels)  # depthwise: the one selection of both sides
    assert conv.kernel_size_list == [3, 5, 7] and conv.mutable_kernel_size is kernel
    x = torch.rand(2, 4 if depthwise else 8, 9, 9)
    for k in (3, 5, 7):
        kernel.current_choice, channels.current_choice = k, 4
        out = conv(x)
        weight = _kernel_crop(conv.weight, k)[:4]
        assert _close(out, F.conv2d(x, weight, conv.bias[:4], padding=k // 2, groups=4 if depthwise else 1))
        static = conv.export()
        assert type(static) is nn.Conv2d and static.kernel_size == (k, k) and static.padding == (k // 2, k // 2)
        assert _close(static(x), out)
        terms = BigNasConv2d.cost_terms(conv, [])
        weight_count = next(p.count for p in terms.params if p.parameter is conv.weight)
        assert math.isclose(weight_count.at(x.shape[1], 4), (4 if depthwise else 32) * k * k)


def test_bignas_conv_refuses_kernel_mutables_that_do_not_fit():
    conv = BigNasConv2d(3, 4, 5, padding=2)
    for mutable, match in ((OneShotMutableValue([3, 4, 5]), "odd positive"), (OneShotMutableValue([3, 7]),
                                                                               "largest kernel_size")):
        with pytest.raises(ConfigError, match=match):
            conv.register_mutable_attr("kernel_size", mutable)
    assert conv.mutable_kernel_size is None and conv.kernel_size_list is None
    with pytest.raises(ConfigError, match="depth"):
        conv.register_mutable_attr("depth", OneShotMutableValue([1, 2]))
    with pytest.raises(ConfigError, match="kernel_size"):  # a plain DynamicConv2d takes channels only
        DynamicConv2d(3, 4, 5).register_mutable_attr("kernel_size", OneShotMutableValue([3, 5]))


def test_ofa_conv_maps_each_smaller_kernel_through_its_transform_matrix():
    torch.manual_seed(0)
    conv = OFAConv2d(4, 6, 7, padding=3)
    kernel = OneShotMutableValue([3, 5, 7])
    conv.register_mutable_attr("kernel_size", kernel)
    assert [n for n, _ in conv.named_parameters()] == ["weight", "bias", "trans_matrix_7to5", "trans_matrix_5to3"]
    with torch.no_grad():  # not the identity, so the test sees the transforms
        conv.trans_matrix_7to5.add_(0.1 * torch.randn(25, 25))
        conv.trans_matrix_5to3.add_(0.1 * torch.randn(9, 9))
    x = torch.rand(2, 4, 9, 9)
    five = (_kernel_crop(conv.weight, 5).reshape(6, 4, 25) @ conv.trans_matrix_7to5.T).reshape(6, 4, 5, 5)
    three = (_kernel_crop(five, 3).reshape(6, 4, 9) @ conv.trans_matrix_5to3.T).reshape(6, 4, 3, 3)
    for k, weight in ((7, conv.weight), (5, five), (3, three)):
        kernel.current_choice = k
        out = conv(x)
        assert _close(out, F.conv2d(x, weight, conv.bias, padding=k // 2))
        assert _close(conv.export()(x), out)
    out.sum().backward()
    assert conv.trans_matrix_5to3.grad.abs().sum() > 0 and conv.trans_matrix_7to5.grad.abs().sum() > 0


def test_adaptive_padding_conv_pads_for_a_same_output_at_the_active_channels():
    torch.manual_seed(0)
    plain = Conv2dAdaptivePadding(6, 8, 3, stride=2, padding=5)
    conv = DynamicConv2dAdaptivePadding.convert_from(plain)
    conv.set_in_channels(torch.tensor([0, 2, 3, 5]))
    conv.set_out_channels(4)
    x = torch.rand(2, 4, 7, 10)
    out = conv(x)
    # 7 rows -> 4 at stride 2: (4 - 1) * 2 + 3 - 7 = 2 rows of padding, 1 on each side; 10 columns -> 5: 1, right
    padded = F.pad(x, [0, 1, 1, 1])
    reference = F.conv2d(padded, plain.weight[:4][:, [0, 2, 3, 5]], plain.bias[:4], stride=2)
    assert out.shape == (2, 4, 4, 5) and _close(out, reference)
    static = conv.export()
    assert type(static) is Conv2dAdaptivePadding and static.padding == (0, 0) and _close(static(x), out)
    assert plain(torch.rand(1, 6, 9, 9)).shape == (1, 8, 5, 5)  # the plain layer pads for itself


def test_dynamic_sequential_runs_and_exports_its_first_blocks():
    torch.manual_seed(0)
    blocks = DynamicSequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), init_cfg=None)
    depth = OneShotMutableValue([1, 2, 3])
    blocks.register_mutable_attr("depth", depth)
    x = torch.rand(3, 4)
    for d in (1, 2, 3):
        depth.current_choice = d
        static = blocks.to_static_op()
        assert type(static) is nn.Sequential and len(static) == d and static[0] is blocks[0]
        assert _close(blocks(x), static(x))
    assert _close(blocks(x), blocks[2](blocks[1](blocks[0](x))))
    with pytest.raises(ConfigError, match=r"ints in \[1, 3\]"):
        DynamicSequential(nn.ReLU(), nn.ReLU(), nn.ReLU()).register_mutable_attr("depth", OneShotMutableValue([2, 4]))
    with pytest.raises(ConfigError, match="supports 'depth'"):
        blocks.register_mutable_attr("width", depth)


def test_dynamic_patch_embed_follows_embed_dims_and_exports_a_patch_embed():
    torch.manual_seed(0)
    plain = PatchEmbed(img_size=32, in_channels=3, embed_dims=16, norm_cfg=dict(type="LN", eps=1e-6))
    embed = DynamicPatchEmbed.convert_from(plain)
    assert embed.projection.weight is plain.projection.weight  # shares the parameters
    dims = OneShotMutableChannel(16, [8, 16])
    embed.register_mutable_attr("embed_dims", dims)
    with pytest.raises(ConfigError, match="already"):
        embed.register_mutable_attr("out_channels", dims)
    x = torch.rand(2, 3, 32, 32)
    assert _close(embed(x), plain(x))  # full width: the plain layer's output
    dims.current_choice = 8
    out = embed(x)
    tokens = F.conv2d(x, plain.projection.weight[:8], plain.projection.bias[:8], stride=16).flatten(2).transpose(1, 2)
    reference = F.layer_norm(tokens, (8,), plain.norm.weight[:8], plain.norm.bias[:8], eps=1e-6)
    assert out.shape == (2, 4, 8) and _close(out, reference)
    static = embed.export()
    assert type(static) is PatchEmbed and static.projection.out_channels == 8 and _close(static(x), out)
    with pytest.raises(ConfigError, match="16 channels"):
        DynamicPatchEmbed(img_size=32, embed_dims=16).register_mutable_attr("embed_dims", OneShotMutableChannel(8))


def test_dynamic_relative_position_keeps_the_tables_columns_its_channel_keeps():
    torch.manual_seed(0)
    position = DynamicRelativePosition2D(head_dims=6, max_relative_position=2)
    head_dims = SimpleMutableChannel(6)
    position.register_mutable_attr("head_dims", head_dims)
    head_dims.current_choice = torch.tensor([True, False, True, True, False, True])
    kept = [0, 2, 3, 5]
    length = 10  # a class token and a 3 x 3 grid
    out = position(length, length)
    side, limit = 3, 2
    expected = torch.empty(length, length, 4)
    for i in range(length):  # mmrazor's arithmetic, one pair at a time
        for j in range(length):
            if i == 0 or j == 0:
                rows = (0, 0)
            else:
                q, k = i - 1, j - 1
                rows = tuple(max(-limit, min(limit, d)) + limit + 1
                             for d in (k // side - q // side, k % side - q % side))
            expected[i, j] = position.embeddings_table_v[rows[0], kept] + position.embeddings_table_h[rows[1], kept]
    assert out.shape == (10, 10, 4) and _close(out, expected)
    static = position.export()
    assert type(static) is RelativePosition2D and static.head_dims == 4 and _close(static(length, length), out)
    with pytest.raises(ConfigError, match="6 channels"):
        DynamicRelativePosition2D(6).register_mutable_attr("head_dims", SimpleMutableChannel(4))
    with pytest.raises(ConfigError, match="already"):
        position.register_mutable_attr("out_channels", head_dims)


class OneShotSupernet(nn.Module):
    """A tiny one-shot supernet of predefined ops: patch embedding, a kernel-size conv, a depth-mutable stack."""

    def __init__(self):
        super().__init__()
        self.embed = DynamicPatchEmbed(img_size=16, in_channels=3, embed_dims=8, conv_cfg=dict(kernel_size=4,
                                                                                               stride=4))
        self.conv = BigNasConv2d(8, 8, 5, padding=2)
        self.blocks = DynamicSequential(DynamicConv2d(8, 8, 1), nn.ReLU(), DynamicConv2d(8, 8, 1))
        self.head = DynamicLinear(8, 3)
        self.width = OneShotMutableChannel(8, [4, 8])
        self.embed.register_mutable_attr("embed_dims", self.width)
        self.conv.register_mutable_attr("in_channels", self.width)
        self.kernel, self.depth = OneShotMutableValue([3, 5]), OneShotMutableValue([1, 3])
        self.conv.register_mutable_attr("kernel_size", self.kernel)
        self.blocks.register_mutable_attr("depth", self.depth)

    def forward(self, x):
        tokens = self.embed(x)  # [N, 16, C]
        x = tokens.transpose(1, 2).reshape(x.shape[0], -1, 4, 4)
        return self.head(self.blocks(self.conv(x)).mean((2, 3)))


def test_a_mutator_exports_a_supernet_of_predefined_ops_to_plain_modules():
    torch.manual_seed(0)
    model = OneShotSupernet().eval()
    mutator = ChannelMutator(dict(type="OneShotMutableChannelUnit", default_args=dict(unit_predefined=False)),
                             parse_cfg=dict(type="Predefined"))
    mutator.prepare_from_supernet(model)
    (unit,) = mutator.mutable_units
    mutator.set_choices({unit.name: 4})
    model.kernel.current_choice, model.depth.current_choice = 3, 1
    x = torch.rand(2, 3, 16, 16)
    small = mutator.export(model)
    assert type(small.embed) is PatchEmbed and type(small.blocks) is nn.Sequential and len(small.blocks) == 1
    assert small.conv.kernel_size == (3, 3) and small.conv.in_channels == 4
    assert not any(type(m).__module__.startswith("pyprune.ops") for m in small.modules())
    assert _close(model(x), small(x))
    assert type(model.blocks) is DynamicSequential  # the supernet is kept


# ------------------------------------------------------------------------------- step_freq counted in epochs
def _mmrazor_schedule(target, supernet, step_freq, prune_times, linear, max_iters, max_epochs):
    """When and to what mmrazor's ItePruneAlgorithm prunes in an epoch-based run, written out from its rules: the
    runner's max_epochs != 1 makes it epoch based, step_freq is multiplied by max_iters / max_epochs (a float), and
    before global iteration i it prunes when i % step_freq == 0 and i // step_freq < prune_times, to step
    i // step_freq + 1 of the schedule (int() where the supernet choice is an int)."""
    freq = step_freq * (max_iters / max_epochs) if max_epochs != 1 else step_freq
    pruned = []
    for i in range(max_iters):
        if i % freq == 0 and i // freq < prune_times:
            ratio = (i // freq + 1) / prune_times
            choices = {}
            for key in target:
                value = (target[key] - supernet[key]) * ratio + supernet[key] if linear else target[key]
                choices[key] = int(value) if isinstance(supernet[key], int) else value
            pruned.append((i, choices))
    return pruned


@pytest.mark.parametrize("step_freq, prune_times, iters_per_epoch, epochs, linear",
                         [(2, 3, 5, 8, True), (1, 4, 3, 5, True), (3, 2, 4, 9, False), (1, 1, 7, 2, True)])
def test_epoch_based_step_freq_prunes_at_mmrazors_iterations_with_its_choices(step_freq, prune_times,
                                                                              iters_per_epoch, epochs, linear):
    algorithm = ItePruneAlgorithm(SingleLineModel(), NUMBER_MUTATOR, target_pruning_ratio={STREAM: 2},
                                  step_freq=step_freq, prune_times=prune_times, linear_schedule=linear,
                                  by_epoch=True, iters_per_epoch=iters_per_epoch)
    expected = _mmrazor_schedule(algorithm.target, algorithm.supernet, step_freq, prune_times, linear,
                                 iters_per_epoch * epochs, epochs)
    seen = []
    for i in range(iters_per_epoch * epochs):
        if algorithm.step():  # pyprune checks after iteration i what mmrazor checks before it
            seen.append((i, {STREAM: algorithm.mutator.current_choices[STREAM]}))
        if (i + 1) % iters_per_epoch == 0:
            assert not algorithm.epoch_end()
    assert seen == expected and len(seen) == min(prune_times, math.ceil(epochs / step_freq))
    assert algorithm.step_freq == step_freq  # stays in epochs; the counter runs in iterations
    manager = ItePruneConfigManager(algorithm.target, algorithm.supernet, step_freq * iters_per_epoch, prune_times,
                                    linear)
    assert [(i, manager.prune_at(i)) for i in range(iters_per_epoch * epochs) if manager.is_prune_time(i)] == expected
