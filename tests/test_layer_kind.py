"""The layer-kind protocol: every registered kind answers every fact, an incomplete kind is refused at registration
with the missing methods named, each kind's cost terms equal FlopCounterMode / parameter counts of its export at
several widths, and the budget costs layers it has no code for (served layers, tied tensors) exactly."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyprune.ops as ops
from pyprune.budget import CostModel
from pyprune.mutators import ChannelMutator, count_flops, count_params
from pyprune.ops.cost_terms import NO_COST, LayerCall
from pyprune.ops.kind_table import LayerKindTable
from pyprune.ops.layer_kind import FACTS, REQUIRED_FACTS, LayerKind, check_layer_kind, missing_facts
from pyprune.ops.registry import unservable_reason

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(autouse=True)
def _no_attention_fast_path():
    """The exported nn.MultiheadAttention's eval fast path is one op FlopCounterMode does not count."""
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(True)


# ------------------------------------------------------------------------------------------ the protocol
def test_every_registered_kind_answers_every_fact():
    assert REQUIRED_FACTS == ("channel_counts", "probe_inputs", "cost_terms")
    kinds = set(ops.DYNAMIC_OPS.values()) | {ops.ChannelParameter, ops.ChannelCount}
    assert {ops.DynamicConv2d, ops.DynamicEmbedding, ops.DynamicChannelNorm} <= kinds
    for kind in kinds:
        assert issubclass(kind, LayerKind) and missing_facts(kind) == [], kind
        assert check_layer_kind(kind) is kind


def test_channel_slots_answer_the_common_facts_through_shared_code():
    own = {name for name in FACTS if name in vars(ops.ChannelParameter)}
    assert own == {"channel_counts", "cost_terms", "probe_inputs"}   # the rest: LayerKind's / OneSelectionKind's
    assert not any(name in vars(ops.ChannelCount) for name in FACTS)
    assert ops.ChannelParameter.shares_selection(None) and ops.ChannelParameter.selection_groups(None) == 1


class Scale(nn.Module):
    """A user layer: ``x [N, C, *] * weight [C]``."""

    def __init__(self, channels=4):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.weight.view(-1, *[1] * (x.dim() - 2))


class DynamicScaleWithoutCost(ops.DynamicChannelMixin, Scale):
    """Everything but the cost terms."""
    _torch_type = Scale
    _channel_tensors = ("weight",)

    @classmethod
    def channel_counts(cls, module):
        return module.weight.shape[0], module.weight.shape[0]

    @classmethod
    def shares_selection(cls, module):
        return True

    @classmethod
    def probe_inputs(cls, module):
        return [((2, module.weight.shape[0], 3), 1)]

    def _channel_dims(self, x):
        return 1, "channels"

    def forward(self, x):
        (weight,) = self.active_tensors()
        return x * weight.view(-1, *[1] * (x.dim() - 2))

    def _static_module(self):
        return Scale(self.active_out_channels)


class DynamicScaleWithClassFactAsMethod(DynamicScaleWithoutCost):
    def channel_counts(self, module):  # an instance method: kind.channel_counts(module) would break
        return 4, 4

    @classmethod
    def cost_terms(cls, module, calls):
        return NO_COST


class DynamicScaleWithoutOpMethods(ops.DynamicChannelMixin, Scale):
    """Facts all given, but neither _torch_type, forward, _static_module / export nor _channel_dims / _check_input."""
    channel_counts = vars(DynamicScaleWithoutCost)["channel_counts"]
    probe_inputs = vars(DynamicScaleWithoutCost)["probe_inputs"]
    cost_terms = vars(DynamicScaleWithClassFactAsMethod)["cost_terms"]


@pytest.mark.parametrize("op,named", [
    (DynamicScaleWithoutCost, r"DynamicScaleWithoutCost .*cost_terms \(not implemented\)"),
    (DynamicScaleWithClassFactAsMethod, r"channel_counts \(must be a classmethod taking the module\)"),
    (DynamicScaleWithoutOpMethods, r"_torch_type .* is not set; forward \(not implemented\); _static_module or "
                                   r"export \(not implemented\); _channel_dims or _check_input \(not implemented\)"),
])
def test_an_incomplete_user_kind_is_refused_at_registration_naming_what_it_lacks(op, named):
    before = dict(ops.DYNAMIC_OPS)
    with pytest.raises(TypeError, match=named):
        ops.register_layer_kind(Scale, op)
    with pytest.raises(TypeError, match=named):
        ops.DYNAMIC_OPS[Scale] = op
    with pytest.raises(TypeError, match=named):  # update checks every entry before adding any
        ops.DYNAMIC_OPS.update({nn.Linear: ops.DynamicLinear, Scale: op})
    assert dict(ops.DYNAMIC_OPS) == before and Scale not in ops.DYNAMIC_OPS


def test_the_table_refuses_non_dynamic_op_classes_and_keeps_complete_ones():
    table = LayerKindTable()
    with pytest.raises(TypeError, match="must be a DynamicOp class"):
        table[Scale] = LayerKind
    with pytest.raises(TypeError, match="must subclass the layer it replaces, Scale"):
        table[Scale] = ops.DynamicLinear
    table[nn.Linear] = ops.DynamicLinear
    table |= {nn.Conv2d: ops.DynamicConv2d}
    assert table == {nn.Linear: ops.DynamicLinear, nn.Conv2d: ops.DynamicConv2d}


class OwnForwardAttention(nn.MultiheadAttention):
    def forward(self, query, key, value, **options):
        return super().forward(query, key, value, **options)


def test_a_kind_without_probe_inputs_leaves_subclasses_with_their_own_forward_unpruned_saying_why():
    layer = OwnForwardAttention(8, 2)
    assert ops.layer_kind(layer).probe_inputs(layer) == []
    assert not ops.is_prunable_layer(layer) and ops.to_dynamic(layer) is None
    assert unservable_reason(layer) == "OwnForwardAttention overrides forward and its layer kind has no probe input"


# ------------------------------------------------------------------------------- each kind's cost terms
def _conv1d_hf():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    return Conv1D(6, 8), lambda w: (torch.randn(2, 3, w),)


def _window_attention(version):
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    cls = swin.ShiftedWindowAttention if version == 1 else swin.ShiftedWindowAttentionV2
    return cls(8, [2, 2], [1, 1], 2), lambda w: (torch.randn(1, 4, 4, w),)


def _seq(w):
    return (torch.randn(2, 3, w),)


def _image(w):
    return (torch.randn(2, w, 5, 5),)


def _attention_inputs(w):
    x = torch.randn(2, 3, w)
    return x, x, x


# a sample layer (and its input at input width w) of every registered layer type: a new kind needs one here
CASES = {
    "conv1d": (lambda: (nn.Conv1d(8, 6, 3), lambda w: (torch.randn(2, w, 7),)), nn.Conv1d),
    "conv2d": (lambda: (nn.Conv2d(8, 6, 3, padding=1), _image), nn.Conv2d),
    "conv2d_grouped": (lambda: (nn.Conv2d(8, 12, 3, groups=4), _image), nn.Conv2d),
    "conv2d_depthwise": (lambda: (nn.Conv2d(8, 8, 3, stride=2, groups=8), _image), nn.Conv2d),
    "conv3d": (lambda: (nn.Conv3d(8, 6, 2), lambda w: (torch.randn(1, w, 3, 3, 3),)), nn.Conv3d),
    "linear": (lambda: (nn.Linear(8, 6), _seq), nn.Linear),
    "batchnorm1d": (lambda: (nn.BatchNorm1d(8), lambda w: (torch.randn(4, w),)), nn.BatchNorm1d),
    "batchnorm2d": (lambda: (nn.BatchNorm2d(8), _image), nn.BatchNorm2d),
    "batchnorm3d": (lambda: (nn.BatchNorm3d(8), lambda w: (torch.randn(2, w, 2, 2, 2),)), nn.BatchNorm3d),
    "layernorm": (lambda: (nn.LayerNorm(8), _seq), nn.LayerNorm),
    "groupnorm": (lambda: (nn.GroupNorm(2, 8), _image), nn.GroupNorm),
    "attention": (lambda: (nn.MultiheadAttention(8, 2, batch_first=True), _attention_inputs), nn.MultiheadAttention),
    "embedding": (lambda: (nn.Embedding(10, 8), lambda w: (torch.randint(0, 10, (2, 3)),)), nn.Embedding),
    "rms_norm": (lambda: (nn.RMSNorm(8), _seq), ops.DynamicChannelNorm),
    "window_attention_v1": (lambda: _window_attention(1), "ShiftedWindowAttention"),
    "window_attention_v2": (lambda: _window_attention(2), "ShiftedWindowAttentionV2"),
    "hf_conv1d": (_conv1d_hf, "Conv1D"),
}


def test_every_registered_layer_type_has_a_cost_case():
    covered = {key if isinstance(key, str) else key.__name__ for _, key in CASES.values()}
    assert {layer_type.__name__ for layer_type in ops.DYNAMIC_OPS} <= covered


def _keep(op, kind, ratio: float, is_output: bool):
    """Keep about ``ratio`` of a side, balanced over the kind's groups."""
    full = kind.channel_counts(op)[0 if is_output else 1]
    groups = kind.selection_groups(op)
    count = groups * max(1, int(ratio * full / groups))
    (op.set_out_channels if is_output else op.set_in_channels)(count)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cost_terms_equal_the_flop_counter_and_parameters_of_the_export_at_every_width(case):
    torch.manual_seed(0)
    layer, inputs = CASES[case][0]()
    op = ops.to_dynamic(layer.eval())
    kind = ops.layer_kind(op)
    prunes_inputs = not kind.shares_selection(op) and not isinstance(op, ops.DynamicEmbedding)  # ids: no channels

    def set_widths(out_ratio, in_ratio):
        _keep(op, kind, out_ratio, True)
        if prunes_inputs:
            _keep(op, kind, in_ratio, False)
        return op.active_out_channels, op.active_out_channels if kind.shares_selection(op) else op.active_in_channels

    set_widths(0.5, 0.5)  # the calls are recorded at a pruned width, as a cost model built at pruned choices does
    args = inputs(op.active_in_channels)
    with torch.no_grad():
        call = LayerCall.record(args, {}, op(*args), (op.active_out_channels, op.active_in_channels))
    terms = kind.cost_terms(op, [call])
    for out_ratio, in_ratio in [(1.0, 1.0), (0.5, 0.5), (0.75, 0.25), (0.25, 1.0)]:
        out_width, in_width = set_widths(out_ratio, in_ratio)
        small = op.export().eval()
        flops = count_flops(small, inputs(op.active_in_channels))
        params = sum(count.at(in_width, out_width) for _, count in terms.params)
        assert round(terms.flops.at(in_width, out_width)) == flops, (out_width, in_width)
        assert round(params) == count_params(small), (out_width, in_width)


# ------------------------------------------------------------------------------ budget with no changes
class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: batch norm in its own forward, then an activation."""

    def forward(self, x):
        out = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                           self.training or not self.track_running_stats, 0.0 if self.momentum is None else
                           self.momentum, self.eps)
        return F.relu(out)


class GainConv(nn.Conv2d):
    """timm's ScaledStdConv2d pattern: an extra per-output parameter ``gain [C_out, 1, 1, 1]`` in its forward."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.gain, self.bias, self.stride, self.padding)


class ServedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.norm = GainConv(3, 8), BatchNormAct(8)
        self.conv, self.head = nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.conv(self.norm(self.stem(x))).mean((2, 3)))


class TiedNet(nn.Module):
    """Token embedding tied to the output layer, a norm and an MLP in between."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Embedding(20, 16), nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.mlp(self.norm(x)))


@pytest.mark.parametrize("net,example", [(ServedNet, torch.randn(2, 3, 8, 8)),
                                         (TiedNet, torch.randint(0, 20, (2, 5)))])
def test_the_budget_costs_served_layers_and_tied_tensors_exactly(net, example):
    torch.manual_seed(0)
    model = net().eval()
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=example))
    mutator.prepare_from_supernet(model)
    if net is ServedNet:
        assert type(model.norm).__name__ == "ServedBatchNormAct" and type(model.stem).__name__ == "ServedGainConv"
    else:
        assert model.head.weight is model.embed.weight and any("embed" in u.name for u in mutator.mutable_units)
    assert len(mutator.mutable_units) >= 2
    cost_model = CostModel.from_model(model, mutator, example)
    for seed in range(3):
        torch.manual_seed(seed)
        mutator.set_choices(mutator.sample_choices())
        small = mutator.export(model)
        cost = cost_model.cost()
        assert (cost.flops, cost.params) == (count_flops(small, (example,)), count_params(small))
