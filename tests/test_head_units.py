"""Head-granular units: a channel dim reshaped into (heads, head_dim) is pruned by whole heads, in hand-written
attention, timm's ViT (fused qkv), HF BERT and Llama (MHA and grouped-query attention, both modes), with the module
attributes that hold head counts following the unit and every export equal to the dynamic model."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.errors import ChannelSelectionError, ConfigError
from pyprune.mutators import ChannelMutator
from pyprune.ops import ChannelCount
from pyprune.tracing import PruningTraceWarning, trace_channel_units

HEAD_DIM = 8


class Attention(nn.Module):
    """Multi-head attention as people write it: separate q / k / v, ``view(B, N, heads, head_dim)``, matmuls."""

    def __init__(self, dim=32, num_heads=4, bias_per_head=None, talking=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.talking = talking  # talking heads: linear maps across the heads before and after the softmax
        if talking:
            self.proj_l, self.proj_w = nn.Linear(num_heads, num_heads), nn.Linear(num_heads, num_heads)
        # None; "param": [heads, N, N], read directly; "table": [num_rel, heads] looked up, viewed with -1 heads and
        # permuted (BEiT); "table_literal": the same viewed with a literal head count; "lookup": [heads, num_rel]
        # looked up along dim 1 (LeViT)
        self.bias_per_head = bias_per_head
        if bias_per_head == "param":
            self.rel_bias = nn.Parameter(torch.randn(num_heads, 5, 5))
        elif bias_per_head in ("table", "table_literal"):
            self.table = nn.Parameter(torch.randn(9, num_heads))
            self.register_buffer("index", torch.arange(25) % 9)
        elif bias_per_head == "lookup":
            self.table = nn.Parameter(torch.randn(num_heads, 9))
            self.register_buffer("index", (torch.arange(25) % 9).view(5, 5))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        if self.bias_per_head == "param":
            attn = attn + self.rel_bias
        elif self.bias_per_head == "table":
            attn = attn + self.table[self.index].view(n, n, -1).permute(2, 0, 1)
        elif self.bias_per_head == "table_literal":
            attn = attn + self.table[self.index].view(n, n, 4).permute(2, 0, 1)
        elif self.bias_per_head == "lookup":
            attn = attn + self.table[:, self.index]
        if self.talking:
            attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(-1)
        if self.talking:
            attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        out = attn @ v
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.embed = nn.Linear(3, 32)
        self.attn = Attention(**kwargs)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        x = self.embed(x)
        return self.head((x + self.attn(x)).mean(1))


def prepared(model, demo, ratio=0.5, tracer_type="auto", **mutator_kwargs):
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=demo, tracer_type=tracer_type),
                             **mutator_kwargs)
    mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(ratio)
    return mutator


def head_unit(mutator, layer):
    return next(u for u in mutator.units if any(r.name == layer and r.expand > 1 for r in u.output_related))


def assert_whole_heads(index, head_dim):
    blocks = index.reshape(-1, head_dim)
    assert torch.equal(blocks, blocks[:, :1] + torch.arange(head_dim)) and bool((blocks[:, 0] % head_dim == 0).all())


def params(model):
    return sum(p.numel() for p in model.parameters())


def check_export(model, mutator, call, atol):
    model.eval()
    with torch.no_grad():
        dynamic = call(model)
    exported = mutator.export(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(call(exported), dynamic, atol=atol, rtol=0)
    return exported


@pytest.mark.parametrize("tracer", ["fx", "torch_function"])
def test_hand_written_attention_keeps_whole_heads(tracer):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 5, 3)
    specs = trace_channel_units(model, x, tracer=tracer)
    heads = next(s for s in specs if s.output_related[0].name == "attn.q")
    assert (heads.num_channels, heads.fixed) == (4, False)
    refs = {(r.name, r.start, r.end, r.is_output_channel, r.expand) for r in heads.output_related + heads.input_related}
    assert refs == {("attn.q", 0, 32, True, 8), ("attn.k", 0, 32, True, 8), ("attn.v", 0, 32, True, 8),
                    ("attn.num_heads", 0, 4, True, 1), ("attn.o", 0, 32, False, 8)}
    mutator = prepared(model, x, tracer_type="FxTracer" if tracer == "fx" else "TorchFunctionTracer")
    unit = head_unit(mutator, "attn.q")
    assert unit.active_channels == 2 and model.attn.num_heads == 2
    assert_whole_heads(model.attn.q.out_index, HEAD_DIM)
    assert torch.equal(model.attn.q.out_index, model.attn.o.in_index)
    exported = check_export(model, mutator, lambda m: m(x), atol=1e-5)
    assert exported.attn.num_heads == 2 and exported.attn.q.out_features == 16 and exported.attn.head_dim == 8


def test_a_head_count_written_as_a_number_fixes_the_group():
    class Literal(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.o = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            b, n, _ = x.shape
            q = self.q(x).view(b, n, 4, 8).transpose(1, 2)  # 4 is no attribute: a pruned model would still ask 4
            return self.o(F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(b, n, -1))

    model = nn.Sequential(nn.Linear(3, 32), Literal(), nn.Linear(32, 2))
    with pytest.warns(PruningTraceWarning, match="splits the channel dim and the head count 4 is written as a num"):
        specs = trace_channel_units(model, torch.randn(2, 5, 3))
    assert next(s for s in specs if s.output_related[0].name == "1.q").fixed


@pytest.mark.parametrize("bias, table_dim", [("param", 0), ("table", 1), ("lookup", 0), ("table_literal", None)])
def test_per_head_tensors_follow_the_heads_or_fix_them(bias, table_dim):
    torch.manual_seed(0)
    model, x = Block(bias_per_head=bias).eval(), torch.randn(2, 5, 3)
    mutator = prepared(model, x)
    unit = head_unit(mutator, "attn.q")
    assert unit.is_mutable == (table_dim is not None)
    name = "attn.rel_bias" if bias == "param" else "attn.table"
    if table_dim is not None:  # the tensor's heads dim (read directly or through lookup / view(-1) / permute)
        assert (name, table_dim) in {(r.name, r.param_dim) for r in unit.output_related}
        assert getattr(model.attn, name.split(".")[-1]).shape[table_dim] == 2  # served at the kept heads
    else:  # a literal head count in the view would stay 4 in a pruned model
        assert "channel-sized tensor" in unit.reason
    check_export(model, mutator, lambda m: m(x), atol=1e-5)


def test_talking_heads_projections_follow_the_heads():
    torch.manual_seed(0)
    model, x = Block(talking=True).eval(), torch.randn(2, 5, 3)
    mutator = prepared(model, x)
    unit = head_unit(mutator, "attn.q")
    assert ("attn.proj_l", False) in {(r.name, r.is_output_channel) for r in unit.input_related}
    assert ("attn.proj_w", True) in {(r.name, r.is_output_channel) for r in unit.output_related}
    assert model.attn.proj_l.in_features == 4 and model.attn.proj_l.active_in_channels == 2
    check_export(model, mutator, lambda m: m(x), atol=1e-5)


def test_fused_heads_read_by_an_op_pyprune_does_not_follow_are_fixed():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.qkv, self.proj = 4, nn.Linear(32, 96), nn.Linear(32, 32)

        def forward(self, x):
            b, n, _ = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, 8).flip(2)  # parts reversed: not followed
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))

    model = nn.Sequential(nn.Linear(3, 32), Fused(), nn.Linear(32, 2)).eval()
    with pytest.warns(PruningTraceWarning, match="fused on one dim"):
        mutator = prepared(model, torch.randn(2, 5, 3))
    assert not any(r.name == "1.qkv" for u in mutator.mutable_units for r in u.output_related)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_timm_vit_prunes_heads_of_its_fused_qkv(qk_norm):
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    model = vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                                 num_classes=10, qk_norm=qk_norm).eval()
    x = torch.randn(2, 3, 32, 32)
    full = params(model)
    mutator = prepared(model, x)
    unit = head_unit(mutator, "blocks.0.attn.qkv")
    assert unit.num_channels == 4 and unit.active_channels == 2
    assert {(r.start, r.end, r.expand) for r in unit.output_related if r.name == "blocks.0.attn.qkv"} == \
        {(0, 64, 16), (64, 128, 16), (128, 192, 16)}  # the same heads of q, k and v
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.attn_dim, attn.head_dim) == (2, 32, 16)
    index = attn.qkv.out_index
    assert_whole_heads(index, 16) and torch.equal(index[32:64] - 64, index[:32])
    exported = check_export(model, mutator, lambda m: m(x), atol=1e-5)
    assert exported.blocks[0].attn.qkv.out_features == 96 and exported.blocks[0].attn.num_heads == 2
    assert params(exported) / full < 0.3


def bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                     num_hidden_layers=2, vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def test_hf_bert_prunes_heads_and_its_head_attributes_follow():
    model, ids = bert(), torch.randint(0, 100, (2, 8))
    mutator = prepared(model, dict(input_ids=ids))
    heads = head_unit(mutator, "bert.encoder.layer.0.attention.self.query")
    assert heads.num_channels == 4 and heads.is_mutable
    attention = model.bert.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size, attention.attention_head_size) == (2, 32, 16)
    exported = check_export(model, mutator, lambda m: m(input_ids=ids).logits, atol=1e-4)
    assert exported.bert.encoder.layer[0].attention.self.key.out_features == 32


def llama(kv_heads, attention="sdpa", heads=4):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      head_dim=64 // heads, intermediate_size=128, num_hidden_layers=2,
                                      vocab_size=100, use_cache=False, attn_implementation=attention)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("kv_heads, attention", [(4, "sdpa"), (2, "sdpa"), (2, "eager")])
def test_hf_llama_keeps_kv_heads_and_prunes_query_heads_per_kv_group(kv_heads, attention):
    model, ids = llama(kv_heads, attention), torch.randint(0, 100, (2, 8))
    mutator = prepared(model, dict(input_ids=ids))
    attn = model.model.layers[0].self_attn
    heads = head_unit(mutator, "model.layers.0.self_attn.q_proj")
    assert heads.is_mutable and heads.active_channels == 2
    kept_q = attn.q_proj.out_index.reshape(-1, 16)[:, 0] // 16
    if kv_heads == 2:  # k / v heads kept, one query head kept in each of the two KV groups
        assert getattr(attn.k_proj, "out_index", None) is None and heads.groups == 2
        assert torch.equal(kept_q // 2, torch.arange(2))
        assert attn.num_key_value_groups == 1
    else:  # multi-head attention: the same heads of q, k and v
        assert torch.equal(attn.k_proj.out_index, attn.q_proj.out_index)
    assert_whole_heads(attn.q_proj.out_index, 16)
    check_export(model, mutator, lambda m: m(input_ids=ids).logits, atol=1e-4)


def test_hf_llama_drops_whole_kv_groups_in_the_second_mode():
    model, ids = llama(2, "sdpa", heads=8), torch.randint(0, 100, (2, 8))
    trace = functools.partial(trace_channel_units, gqa="drop_kv_groups")
    mutator = prepared(model, dict(input_ids=ids), trace_fn=trace)
    unit = head_unit(mutator, "model.layers.0.self_attn.q_proj")
    assert unit.num_channels == 2 and unit.active_channels == 1  # KV groups of 4 query heads each
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_index.numel() == 8 and attn.q_proj.out_index.numel() == 32
    assert attn.num_key_value_groups == 4
    check_export(model, mutator, lambda m: m(input_ids=ids).logits, atol=1e-4)


def test_unknown_gqa_mode_is_refused():
    with pytest.raises(ConfigError, match="unknown gqa mode 'some'.*keep_kv"):
        trace_channel_units(Block(), torch.randn(2, 5, 3), gqa="some")


def test_a_count_spanning_several_blocks_holds_one_block():
    model = Attention()
    model.num_key_value_groups = 2
    count = ChannelCount(model, "num_key_value_groups", span=8)
    assert (count.num_channels, count.per) == (8, 4)
    count.set_out_index(torch.tensor([0, 2, 4, 6]))
    assert model.num_key_value_groups == 1
    with pytest.raises(ChannelSelectionError, match="do not split into 4 equal blocks"):
        count.set_out_index(torch.tensor([0, 1, 2]))
