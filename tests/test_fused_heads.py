"""Attention heads in fused projections: a q | k | v output sliced at ints the code computes from head counts
(HF Phi-3's ``qkv[..., :num_heads * head_dim]``) is one head group per part, the slice bounds follow the parts'
head counts (those of a module's config get a view of its own, see pyprune.ops.config_view); a bound no int
attribute counts fixes its part. Every export equals the dynamic model and runs in the model's own code."""
import pytest
import torch
from torch import nn

from pyprune.mutators import ChannelMutator
from pyprune.ops.config_view import ConfigView
from pyprune.tracing import trace_channel_units


def prepared(model, demo, ratio=0.5):
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=demo))
    mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(ratio)
    return mutator


def unit_of(mutator, name, start=0):
    return next(u for u in mutator.units if any(r.name == name and r.start == start and r.expand > 1
                                                for r in u.output_related))


def check_export(model, mutator, call, atol=1e-5):
    model.eval()
    with torch.no_grad():
        dynamic = call(model)
    exported = mutator.export(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(call(exported), dynamic, atol=atol, rtol=0)
    return exported


def phi3():
    transformers = pytest.importorskip("transformers")
    config = transformers.Phi3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                                     pad_token_id=0, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(config).eval(), torch.randint(0, 100, (2, 8))


def test_phi3_prunes_query_heads_of_its_sliced_qkv_and_each_layer_holds_its_own_head_count():
    model, ids = phi3()
    mutator = prepared(model, dict(input_ids=ids))
    queries = [unit_of(mutator, f"model.layers.{i}.self_attn.qkv_proj") for i in range(2)]
    for i, unit in enumerate(queries):  # q heads: their own unit, 2 KV groups kept balanced, the count follows
        assert unit.is_mutable and unit.num_channels == 4 and unit.groups == 2
        assert any(r.name == f"model.layers.{i}.self_attn.config.num_attention_heads" for r in unit.output_related)
    kv = unit_of(mutator, "model.layers.0.self_attn.qkv_proj", start=64)
    assert not kv.is_mutable  # gqa="keep_kv"
    queries[1].current_choice = 1.0  # layer 0 keeps 2 query heads, layer 1 all 4: a config per layer
    attention = [model.model.layers[i].self_attn for i in range(2)]
    assert isinstance(attention[0].config, ConfigView) and attention[0].config.num_attention_heads == 2
    assert attention[1].config.num_attention_heads == 4 and model.config.num_attention_heads == 4
    assert attention[0].qkv_proj.out_index.numel() == 2 * 16 + 64 and attention[0].num_key_value_groups == 1
    exported = check_export(model, mutator, lambda m: m(input_ids=ids).logits)
    layer = exported.model.layers[0].self_attn
    assert type(layer).__name__ == "Phi3Attention" and layer.config.num_attention_heads == 2
    assert layer.qkv_proj.weight.shape == (96, 32) and layer.o_proj.weight.shape == (32, 32)  # hidden halved too
    exported.train()
    exported(input_ids=ids).logits.square().mean().backward()
    assert layer.qkv_proj.weight.grad is not None
    assert model.config.num_attention_heads == 4  # the model's own config is never written


class SlicedAttention(nn.Module):
    """q | k | v in one Linear, sliced at ``q_width`` / ``2 * q_width``; ``counted``: the head count is an
    attribute (the bound a pruned model computes follows it), else written as a number."""

    def __init__(self, counted: bool, dim=32, heads=4):
        super().__init__()
        self.embed, self.qkv, self.proj, self.head_dim = nn.Linear(3, dim), nn.Linear(dim, 3 * dim), \
            nn.Linear(dim, 2), dim // heads
        self.counted = counted
        if counted:
            self.num_heads = heads

    def forward(self, x):
        qkv = self.qkv(self.embed(x))
        b, n = qkv.shape[:2]
        width = self.num_heads * self.head_dim if self.counted else 32
        q, k, v = qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:]
        q, k, v = (t.reshape(b, n, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1)).mean(1)


@pytest.mark.parametrize("tracer", ["fx", "torch_function"])
def test_slice_bounds_follow_counted_heads_and_fix_the_parts_they_cannot_count(tracer):
    x = torch.randn(2, 5, 3)
    specs = trace_channel_units(SlicedAttention(counted=True), x, tracer=tracer)
    heads = [s for s in specs if any(r.name == "qkv" and r.expand == 8 for r in s.output_related)]
    assert len(heads) == 1 and not heads[0].fixed and heads[0].num_channels == 4
    assert {(r.start, r.end) for r in heads[0].output_related if r.name == "qkv"} == {(0, 32), (32, 64), (64, 96)}
    assert any(r.name == "num_heads" for r in heads[0].output_related)
    model = SlicedAttention(counted=True)
    check_export(model, prepared(model, x), lambda m: m(x))
    specs = trace_channel_units(SlicedAttention(counted=False), x, tracer=tracer)
    sliced = [s for s in specs if any(r.name == "qkv" for r in s.output_related)]
    assert sliced and all(s.fixed for s in sliced)
    assert any("slices a fused output at a bound written as a number" in s.reason for s in sliced)
