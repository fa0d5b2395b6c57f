"""A Linear whose weight the enclosing module's code reads: ``F.linear(x, weight=self.qkv.weight,
bias=torch.cat((self.q_bias, self.k_bias, self.v_bias)))`` (timm's BEiT / EVA attention). The tracer maps the call
as the Linear's (refs marked ``read_by``), each bias piece a channel tensor of its part's heads; a prepared model
hands the reader the weight at the kept rows and columns while it runs (pyprune.ops.read_layers), the full tensors
stay registered, and the export is the plain module with smaller tensors, equal to the dynamic model."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune import ops
from pyprune.channels import ref_from_dict, ref_to_dict
from pyprune.mutators import ChannelMutator
from pyprune.tracing import trace_channel_units
from pyprune.units.channel_config import channel_refs


class FusedBiasAttention(nn.Module):
    """BEiT's attention, reduced: a fused qkv Linear without bias, read by this forward with a concatenated bias."""

    def __init__(self, dim=32, num_heads=4, bias_of=None):
        super().__init__()
        self.num_heads, self.attn_dim = num_heads, dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.bias_of = bias_of or (lambda m: torch.cat((m.q_bias, m.k_bias, m.v_bias)))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        qkv = F.linear(x, weight=self.qkv.weight, bias=self.bias_of(self))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


class Net(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = FusedBiasAttention(**kwargs)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.attn(self.embed(x)))


def heads_unit(specs):
    return next(s for s in specs if any(r.name == "attn.qkv" and r.is_output_channel for r in s.output_related))


@pytest.mark.parametrize("tracer", ["fx", "torch_function"])
def test_functional_linear_over_a_layer_weight_is_that_layer_and_its_bias_pieces_follow_the_heads(tracer):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unmapped
        specs = trace_channel_units(Net(), torch.randn(2, 6, 8), tracer=tracer)
    unit = heads_unit(specs)
    assert not unit.fixed and unit.num_channels == 4
    qkv = [(r.start, r.end, r.expand, r.read_by) for r in unit.output_related if r.name == "attn.qkv"]
    assert qkv == [(0, 32, 8, "attn"), (32, 64, 8, "attn"), (64, 96, 8, "attn")]
    pieces = {r.name: (r.start, r.end, r.param_dim) for r in unit.output_related if r.param_dim is not None}
    assert pieces == {"attn.q_bias": (0, 32, 0), "attn.k_bias": (0, 32, 0), "attn.v_bias": (0, 32, 0)}
    residual = next(s for s in specs if any(r.name == "attn.qkv" and not r.is_output_channel
                                            for r in s.input_related))
    assert not residual.fixed
    assert [r.read_by for r in residual.input_related if r.name == "attn.qkv"] == ["attn"]


def test_a_bias_computed_from_the_pieces_fixes_the_call_with_a_warning():
    net = Net(bias_of=lambda m: torch.cat((m.q_bias * 2, m.k_bias, m.v_bias)))
    with pytest.warns(UserWarning, match="bias"):
        specs = trace_channel_units(net, torch.randn(2, 6, 8), tracer="fx")
    embedded = next(s for s in specs if any(r.name == "embed" for r in s.output_related))
    assert embedded.fixed and "linear" in embedded.reason  # the residual width the call reads stays whole
    assert not any(r.name.startswith(("attn.qkv", "attn.q_bias")) for s in specs for r in s.output_related)


def test_read_by_survives_the_config_round_trip():
    ref = heads_unit(trace_channel_units(Net(), torch.randn(2, 6, 8))).output_related[1]
    entry = ref_to_dict(ref)
    assert entry["read_by"] == "attn" and ref_from_dict(entry) == ref
    assert channel_refs([entry], True, 4, "u")[0].read_by == "attn"


def prepared(model, demo, ratio=0.5):
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=demo))
    mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(ratio)
    return mutator


def test_the_reader_gets_the_kept_weight_the_model_keeps_the_full_one_and_the_export_equals_it():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 6, 8)
    mutator = prepared(model, x)
    qkv = model.attn.qkv
    assert isinstance(qkv, ops.DynamicLinear) and ops.read_layers(model.attn) == ("qkv",)
    assert qkv.active_out_channels == 48 and qkv.active_in_channels == 16  # 2 heads of 8 in each part
    with torch.no_grad():
        dynamic = model(x)
    assert "weight" not in qkv.__dict__ and qkv.weight.shape == (96, 32)  # served only while the reader runs
    assert model.state_dict()["attn.qkv.weight"].shape == (96, 32)
    model.train()
    model(x).sum().backward()  # gradients reach the kept rows and columns of the full weight only
    grad = qkv.weight.grad
    assert grad.shape == (96, 32) and grad[qkv.out_index][:, qkv.in_index].abs().sum() > 0
    pruned = grad.clone()
    pruned[qkv.out_index[:, None], qkv.in_index] = 0
    assert pruned.abs().sum() == 0
    model.eval()
    exported = mutator.export(model).eval()
    attn = exported.attn
    assert type(attn) is FusedBiasAttention and type(attn.qkv) is nn.Linear
    assert attn.qkv.weight.shape == (48, 16) and attn.q_bias.shape == (16,) and attn.k_bias.shape == (16,)
    assert not attn._forward_pre_hooks and not attn._forward_hooks and attn.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(exported(x), dynamic, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), dynamic, atol=1e-6, rtol=0)  # the dynamic model is still served


def test_a_unit_prepared_on_its_own_serves_the_reader_too():
    from pyprune.units import SequentialMutableChannelUnit
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 6, 8)
    with torch.no_grad():
        full = model(x)
    spec = heads_unit(trace_channel_units(model, x))
    unit = SequentialMutableChannelUnit.from_spec(spec, choice_mode="ratio")
    unit.prepare_for_pruning(model)
    assert ops.read_layers(model.attn) == ("qkv",)
    unit.current_choice = 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(x), full, atol=1e-6, rtol=0)
        unit.current_choice = 0.5
        assert model(x).shape == full.shape and model.attn.qkv.active_out_channels == 48


def test_compact_training_hands_the_reader_its_held_weight():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 6, 8)
    mutator = prepared(model, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        expected = model.eval()(x)
    with ops.compact_training(model, optimizer):
        assert model.attn.qkv._parameters["weight"].shape == (48, 16)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    assert model.attn.qkv.weight.shape == (96, 32)


def test_small_beit_prunes_heads_and_residual_and_exports_the_timm_class():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, embed_dim=64, depth=2, num_heads=4,
                              img_size=32, patch_size=8, num_classes=10).eval()
    for name, parameter in model.named_parameters():
        if name.endswith(("q_bias", "v_bias")):
            nn.init.normal_(parameter, std=0.1)  # zeros by default: a wrong slice would not show
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mutator = prepared(model, x)
    before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        dynamic = model(x)
    exported = mutator.export(model).eval()
    assert type(exported.blocks[0].attn) is timm.models.beit.Attention
    assert sum(p.numel() for p in exported.parameters()) / before < 0.35
    with torch.no_grad():
        torch.testing.assert_close(exported(x), dynamic, atol=1e-5, rtol=0)


def test_the_cost_model_counts_the_read_weight_as_the_layer_it_is():
    from pyprune.budget.cost import CostModel
    from pyprune.mutators.summary import count_flops, count_params
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 6, 8)
    mutator = prepared(model, x, ratio=1.0)
    costs = CostModel.from_model(model, mutator, x)
    assert [len(layer.out_side.parts) for layer in costs.layers if layer.name == "attn.qkv"] == [3]
    mutator.set_global_ratio(0.5)
    predicted = costs.cost()
    exported = mutator.export(model)
    assert (predicted.flops, predicted.params) == (count_flops(exported, x), count_params(exported))


def test_a_deep_copy_serves_its_own_layer_and_the_batched_gather_hands_the_reader_its_tensors():
    import copy
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 6, 8)
    prepared(model, x)
    twin = copy.deepcopy(model)
    twin.attn.qkv.set_out_index(None)  # the copy's layer at full width, with the copy's own heads reverted
    twin.attn.qkv.set_in_index(None)
    assert model.attn.qkv.active_out_channels == 48 and ops.read_layers(twin.attn) == ("qkv",)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    handle = ops.batched_gather(model)
    try:
        got = model(x)  # a training forward with grad: the gather hands qkv its tensors, the reader takes them
        got.sum().backward()
    finally:
        handle.remove()
    torch.testing.assert_close(got.detach(), expected, atol=1e-6, rtol=0)
    assert model.attn.qkv.weight.grad[model.attn.qkv.out_index].abs().sum() > 0


def test_a_config_whose_read_by_names_no_module_holding_the_layer_is_refused_with_the_model_unchanged():
    from pyprune.errors import ConfigError
    model, x = Net(), torch.randn(2, 6, 8)
    specs = trace_channel_units(model, x)
    for spec in specs:
        for ref in spec.output_related + spec.input_related:
            if ref.read_by is not None:
                ref.read_by = "head"
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=x),
                             trace_fn=lambda *args, **kwargs: specs)
    with pytest.raises(ConfigError, match="attn.qkv: read_by 'head'"):
        mutator.prepare_from_supernet(model)
    assert type(model.attn.qkv) is nn.Linear and not model.attn._forward_pre_hooks and not model.head._forward_hooks


def test_small_eva02_with_rotary_embeddings_prunes_heads_and_residual():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, patch_size=14, depth=2,
                              embed_dim=64, num_heads=4, num_classes=10).eval()
    for name, parameter in model.named_parameters():
        if name.endswith(("q_bias", "v_bias")):
            nn.init.normal_(parameter, std=0.1)
    x = torch.randn(2, 3, 56, 56)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused call and the rotary pairs (torch.stack) are all mapped
        mutator = prepared(model, x)
    attention = model.blocks[0].attn
    assert ops.read_layers(attention) == ("qkv",) and attention.qkv.active_out_channels == 3 * 32
    with torch.no_grad():
        dynamic = model(x)
    exported = mutator.export(model).eval()
    assert type(exported.blocks[0].attn) is timm.models.eva.EvaAttention
    assert exported.blocks[0].attn.qkv.weight.shape == (96, 32) and exported.blocks[0].attn.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(exported(x), dynamic, atol=1e-5, rtol=0)


def test_a_reader_forward_that_raises_leaves_the_layer_with_its_full_tensors():
    model, x = Net(), torch.randn(2, 6, 8)
    prepared(model, x)

    def failing(attention):
        assert attention.qkv.weight.shape == (48, 16)  # the kept weight while the reader runs
        raise RuntimeError("the reader's own code failed")

    model.attn.bias_of = failing
    with pytest.raises(RuntimeError, match="own code failed"):
        model(x)
    qkv = model.attn.qkv
    assert "weight" not in qkv.__dict__ and qkv.in_features == 32 and qkv.weight.shape == (96, 32)
