"""HuggingFace layers and the hidden size: GPT-2's transposed Conv1D, nn.Embedding (tied to the output layer or not)
and norms recognised by structure (``*RMSNorm``, T5's norm, timm's RmsNorm) prune, equal their exports and keep
tied tensors tied; tiny GPT-2 / Llama / BERT built from configs (no download) prune their MLP and hidden size.

Tolerances: single layers are fp32 with the same arithmetic as their export (TOL, 1e-5); whole models compare
logits at atol 1e-4 (1e-4 of the output scale: the logits here are O(1)).
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import pyprune.ops as ops  # noqa: E402
from helpers import TOL, randomize  # noqa: E402
from pyprune.errors import ChannelSelectionError  # noqa: E402
from pyprune.mutators import ChannelMutator  # noqa: E402
from pyprune.ops.channel_norm import DynamicChannelNorm  # noqa: E402
from pyprune.ops.served import ServedForward, serving_probe  # noqa: E402
from pyprune.tracing import trace_channel_units  # noqa: E402
from pyprune.tracing.rules_layers import LAYER_RULES  # noqa: E402

MODEL_TOL = dict(rtol=0, atol=1e-4)
VOCAB = 128


# ------------------------------------------------------------------------------------------------------ Conv1D
def test_conv1d_equals_its_export_and_its_gradients_land_in_the_kept_rows_and_columns():
    assert ops.DYNAMIC_OPS[Conv1D].__name__ == "DynamicConv1D" and Conv1D in LAYER_RULES
    assert set(LAYER_RULES) == set(ops.DYNAMIC_OPS)  # the optional type joined both tables together
    layer = randomize(Conv1D(6, 5))                  # nf=6 outputs, nx=5 inputs: weight [5, 6]
    op = ops.to_dynamic(layer)
    torch.testing.assert_close(ops.layer_kind(layer).importance_rows(layer), layer.weight.t())
    op.set_out_channels(torch.tensor([0, 2, 5]))
    op.set_in_channels(torch.tensor([1, 3]))
    exported = op.export()
    assert type(exported) is Conv1D and (exported.nf, exported.nx) == (3, 2)
    torch.testing.assert_close(exported.weight, layer.weight[[1, 3]][:, [0, 2, 5]])
    x = torch.randn(2, 4, 2, requires_grad=True)
    y = op(x)
    torch.testing.assert_close(y, exported(x), **TOL)
    y.square().sum().backward()
    touched = op.weight.grad != 0
    assert op.weight.grad.shape == (5, 6) and touched[[1, 3]][:, [0, 2, 5]].all()
    assert touched.sum() == 6 and torch.count_nonzero(op.bias.grad[[1, 3, 4]]) == 0
    with pytest.raises(ChannelSelectionError, match="active input channels are 2"):
        op(torch.randn(2, 4, 5))


# --------------------------------------------------------------------------------------------------- Embedding
def test_embedding_prunes_its_columns_keeps_padding_idx_and_refuses_its_rows():
    table = randomize(nn.Embedding(10, 6, padding_idx=0))
    op = ops.to_dynamic(table)
    op.set_out_channels(torch.tensor([1, 4, 5]))
    exported = op.export()
    assert type(exported) is nn.Embedding and exported.weight.shape == (10, 3) and exported.padding_idx == 0
    ids = torch.tensor([[0, 3, 7], [9, 0, 2]])
    y = op(ids)
    torch.testing.assert_close(y, exported(ids), **TOL)
    y.sum().backward()
    grad = op.weight.grad
    assert grad.shape == (10, 6) and torch.count_nonzero(grad[:, [0, 2, 3]]) == 0 and torch.count_nonzero(grad[0]) == 0
    assert torch.count_nonzero(grad[3, [1, 4, 5]]) == 3
    with pytest.raises(ChannelSelectionError, match="token ids"):
        op.set_in_channels(0.5)
    with pytest.raises(ChannelSelectionError, match="integer ids"):
        op(torch.randn(2, 3))
    assert ops.to_dynamic(nn.Embedding(10, 6, sparse=True)) is None


def test_embedding_max_norm_renormalises_the_kept_columns_like_its_export():
    table = nn.Embedding(8, 6, max_norm=1.0)
    with torch.no_grad():
        table.weight.mul_(3.0)
    op = ops.to_dynamic(table)
    op.set_out_channels(torch.tensor([0, 2, 3]))
    exported = op.export()
    dropped = op.weight[:, [1, 4, 5]].detach().clone()
    ids = torch.tensor([1, 5, 6])
    for _ in range(2):  # the export renormalises its table in place on the first call; both must agree on both
        torch.testing.assert_close(op(ids), exported(ids), **TOL)
    torch.testing.assert_close(op.weight[:, [0, 2, 3]], exported.weight, **TOL)
    assert torch.equal(op.weight[:, [1, 4, 5]], dropped)
    assert exported.weight[ids].norm(dim=1).max() <= 1.0 + 1e-5


# ---------------------------------------------------------------------------------------------- channel norms
def _hf_norms():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    norms = {"LlamaRMSNorm": (lambda: LlamaRMSNorm(8), -1), "Qwen2RMSNorm": (lambda: Qwen2RMSNorm(8), -1),
             "T5LayerNorm": (lambda: T5LayerNorm(8), -1), "torch RMSNorm": (lambda: nn.RMSNorm(8), -1)}
    timm = pytest.importorskip("timm.layers")
    norms.update({"timm RmsNorm": (lambda: timm.RmsNorm(8), -1), "timm RmsNorm2d": (lambda: timm.RmsNorm2d(8), 1)})
    return norms


@pytest.mark.parametrize("name", ["LlamaRMSNorm", "Qwen2RMSNorm", "T5LayerNorm", "torch RMSNorm", "timm RmsNorm",
                                  "timm RmsNorm2d"])
def test_norm_recognised_by_structure_is_served_equals_its_export_and_trains_its_kept_channels(name):
    make, dim = _hf_norms()[name]
    norm = randomize(make())
    assert ops.registered_base(norm) is DynamicChannelNorm and serving_probe(norm).channel_dim == dim
    op = ops.to_dynamic(norm)
    assert isinstance(op, ServedForward) and isinstance(op, type(norm))
    keep = torch.tensor([0, 3, 4, 6])
    op.set_out_index(keep)
    exported = op.export()
    assert type(exported) is type(norm) and exported.weight.shape == (4,)
    x = torch.randn(2, 3, 4) if dim == -1 else torch.randn(2, 4, 3, 3)
    y = op(x)
    torch.testing.assert_close(y, exported(x), **TOL)
    y.square().sum().backward()
    assert op.weight.grad.shape == (8,) and torch.count_nonzero(op.weight.grad[[1, 2, 5, 7]]) == 0
    assert ops.layer_kind(norm).norm_scale(norm).shape == (8,)
    assert op.weight.shape == (8,)  # the compact tensors are served only while the forward runs


class _Flipped(nn.Module):
    """A per-channel weight, then the channels reversed: channel c out comes from channel C-1-c in."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return (x * self.weight).flip(-1)


class _Cumulative(_Flipped):
    def forward(self, x):
        return torch.cumsum(x, -1) * self.weight


class _WithChild(_Flipped):
    def __init__(self, channels):
        super().__init__(channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        return self.proj(x) * self.weight


@pytest.mark.parametrize("module_type", [_Flipped, _Cumulative])
def test_a_per_channel_weight_that_mixes_channels_is_not_a_norm(module_type):
    module = module_type(8)
    assert DynamicChannelNorm.matches(module)
    assert "mixes channels" in serving_probe(module, DynamicChannelNorm).reason
    assert ops.registered_base(module) is None and ops.to_dynamic(module) is None


def test_structural_test_refuses_children_with_parameters_and_other_shapes():
    assert not DynamicChannelNorm.matches(_WithChild(8))
    odd = _Flipped(8)
    odd.register_buffer("table", torch.rand(8, 8))
    assert not DynamicChannelNorm.matches(odd)
    assert not DynamicChannelNorm.matches(_Flipped(1))


def test_norm_on_the_meta_device_is_probed_on_a_cpu_copy():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(16).to("meta")
    assert ops.registered_base(norm) is DynamicChannelNorm and norm.weight.is_meta


class _NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        self.up, self.norm, self.down = nn.Linear(4, 8), LlamaRMSNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.down(self.norm(self.up(x)))


def test_recorded_forward_probes_a_norm_it_meets_first_without_recording_the_probe():
    model = randomize(_NormNet())
    specs = trace_channel_units(model, torch.randn(2, 5, 4), tracer="torch_function")
    mutable = [s for s in specs if not s.fixed]
    assert len(mutable) == 1 and {r.name for r in mutable[0].output_related} == {"up", "norm"}
    assert [r.name for r in mutable[0].input_related] == ["down"]


# --------------------------------------------------------------------------------------------- compact training
def _three_layers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    return {"conv1d": (Conv1D(6, 5), torch.tensor([0, 2, 5]), torch.tensor([1, 3]), lambda: torch.randn(3, 2)),
            "embedding": (nn.Embedding(10, 6), torch.tensor([1, 4, 5]), None, lambda: torch.tensor([1, 4, 9])),
            "rmsnorm": (LlamaRMSNorm(6), torch.tensor([0, 3, 4]), None, lambda: torch.randn(2, 3))}


@pytest.mark.parametrize("kind", ["conv1d", "embedding", "rmsnorm"])
def test_new_layers_train_in_compact_mode_like_gather_mode(kind):
    torch.manual_seed(0)
    layer, out_index, in_index, make_input = _three_layers()[kind]
    op = ops.to_dynamic(randomize(layer))
    op.set_out_index(out_index)
    if in_index is not None:
        op.set_in_index(in_index)
    holder, reference = nn.Sequential(op), copy.deepcopy(nn.Sequential(op))
    optimizer, reference_optimizer = (torch.optim.Adam(m.parameters(), lr=0.1) for m in (holder, reference))
    x = make_input()
    with ops.compact_training(holder, optimizer):
        assert ops.holds_compact(op)
        for model, opt in ((holder, optimizer), (reference, reference_optimizer)):
            for _ in range(2):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
        torch.testing.assert_close(holder(x), reference(x), **TOL)
    for (key, value), expected in zip(holder.state_dict().items(), reference.state_dict().values()):
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, expected, **TOL, msg=key)


# ------------------------------------------------------------------------------------------------ whole models
def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32,
                                     use_cache=False)
    return transformers.GPT2LMHeadModel(config)


def _llama(tied=False):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      use_cache=False, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config)


def _bert_mlm():
    config = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=32)
    return transformers.BertForMaskedLM(config)


def _pruned(make):
    """(model prepared and set to ratio 0.5, its export, the mutator, demo ids, logits of the unpruned model)."""
    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        full = model(input_ids=ids).logits
    mutator = ChannelMutator(channel_unit_cfg="L1MutableChannelUnit",
                             parse_cfg=dict(demo_input=dict(input_ids=ids)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx cannot trace them: a recorded forward, warned
        mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(0.5)
    return model, mutator.export(model), mutator, ids, full


def _check_equal_and_smaller(model, small, ids, full):
    with torch.no_grad():
        dynamic, exported = model(input_ids=ids).logits, small(input_ids=ids).logits
    torch.testing.assert_close(dynamic, exported, **MODEL_TOL)
    assert not torch.allclose(dynamic, full, atol=1e-3)  # pruning changed the model
    kept = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    return kept


def _mutable(mutator):
    return {u.name for u in mutator.mutable_units}


def test_gpt2_prunes_mlp_and_hidden_size_keeps_the_tie_and_splits_c_attn_into_q_k_v():
    model, small, mutator, ids, full = _pruned(_gpt2)
    assert _mutable(mutator) == {"transformer.wte_(0, 64)_64", "transformer.h.0.mlp.c_fc_(0, 256)_256",
                                 "transformer.h.1.mlp.c_fc_(0, 256)_256", "transformer.h.0.attn.c_attn_(0, 64)_4",
                                 "transformer.h.1.attn.c_attn_(0, 64)_4"}
    heads = mutator._by_name["transformer.h.0.attn.c_attn_(0, 64)_4"]  # q | k | v pieces, split into 4 heads each
    assert {(r.start, r.end, r.expand) for r in heads.output_related if r.name.endswith("c_attn")} == \
        {(0, 64, 16), (64, 128, 16), (128, 192, 16)}
    assert small.transformer.h[0].attn.split_size == 32 and small.transformer.h[0].attn.num_heads == 2
    assert isinstance(model.transformer.h[0].ln_1, ops.DynamicLayerNorm)
    kept = _check_equal_and_smaller(model, small, ids, full)
    assert kept < 0.4
    assert small.lm_head.weight is small.transformer.wte.weight and small.lm_head.weight.shape == (VOCAB, 32)
    assert type(small.transformer.h[0].mlp.c_fc) is Conv1D and small.transformer.h[0].mlp.c_fc.nf == 128


@pytest.mark.parametrize("tied", [False, True])
def test_llama_prunes_mlp_and_hidden_size_through_its_rms_norms(tied):
    model, small, mutator, ids, full = _pruned(lambda: _llama(tied))
    per_layer = {f"model.layers.{i}.{unit}" for i in (0, 1)
                 for unit in ("mlp.gate_proj_(0, 128)_128", "self_attn.q_proj_(0, 64)_4")}
    assert _mutable(mutator) == {"model.embed_tokens_(0, 64)_64"} | per_layer
    assert isinstance(model.model.norm, DynamicChannelNorm) and isinstance(model.model.norm, ServedForward)
    kept = _check_equal_and_smaller(model, small, ids, full)
    assert kept < 0.4
    assert small.model.norm.weight.shape == (32,) and small.model.embed_tokens.embedding_dim == 32
    assert (small.lm_head.weight is small.model.embed_tokens.weight) == tied


def test_bert_masked_lm_merges_the_head_transform_into_the_tied_hidden_unit():
    model, small, mutator, ids, full = _pruned(_bert_mlm)
    hidden = mutator._by_name["bert.embeddings.word_embeddings_(0, 64)_64"]
    names = {r.name for r in hidden.output_related + hidden.input_related}
    assert hidden.is_mutable and {"cls.predictions.transform.dense", "cls.predictions.decoder"} <= names
    _check_equal_and_smaller(model, small, ids, full)
    assert small.cls.predictions.decoder.weight is small.bert.embeddings.word_embeddings.weight


class _TiedThroughAFlip(nn.Module):
    """The tied output layer reads a tensor the tracer cannot follow (a flip of the channels)."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix = nn.Embedding(12, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.mix(self.embed(ids)).flip(-1))


def test_tied_tensor_whose_other_holder_reads_it_whole_stays_unpruned():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        specs = trace_channel_units(_TiedThroughAFlip(), dict(ids=torch.randint(0, 12, (2, 5))))
    embed = next(s for s in specs if s.output_related and s.output_related[0].name == "embed")
    assert embed.fixed and "embed.weight is shared" in embed.reason


def test_a_per_channel_slope_that_does_not_normalise_is_not_a_norm():
    assert DynamicChannelNorm.matches(nn.PReLU(8))
    assert "does not normalise" in serving_probe(nn.PReLU(8), DynamicChannelNorm).reason
    assert ops.to_dynamic(nn.PReLU(8)) is None


class _ScaledEmbedding(nn.Embedding):
    """Gemma's pattern: the lookup times a scale, in the subclass's own forward."""

    def __init__(self, rows, dim):
        super().__init__(rows, dim)
        self.register_buffer("scale", torch.tensor(dim ** 0.5), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.scale


def test_an_embedding_subclass_with_its_own_forward_is_served_at_the_kept_columns():
    table = randomize(_ScaledEmbedding(10, 6))
    op = ops.to_dynamic(table)
    assert op is not None and isinstance(op, ServedForward) and serving_probe(table).channel_dim == -1
    op.set_out_channels(torch.tensor([0, 3, 4]))
    ids = torch.tensor([[1, 9, 2]])
    exported = op.export()
    assert type(exported) is _ScaledEmbedding and exported.weight.shape == (10, 3)
    torch.testing.assert_close(op(ids), table.weight[ids][..., [0, 3, 4]] * table.scale, **TOL)  # its own scale
    torch.testing.assert_close(exported(ids), op(ids), **TOL)
