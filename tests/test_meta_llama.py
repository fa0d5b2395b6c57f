"""An 8B-Llama-shaped model (Llama-3-8B's sizes, GQA 32 / 8 heads) on the meta device: prepare finds every head,
hidden-size and MLP unit, and the export at ratio 0.5 is a meta model whose config carries the new sizes (no data is
ever allocated; ``benchmarks/bench_meta_llama.py`` times the same steps and reports their memory)."""
import functools
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pyprune.app.bench.transformers_zoo import llama_8b_config, unit_kinds  # noqa: E402
from pyprune.mutators import ChannelMutator  # noqa: E402
from pyprune.tracing import trace_channel_units  # noqa: E402

LAYERS = 32


@pytest.mark.parametrize("gqa, kv_heads", [("keep_kv", 8), pytest.param("drop_kv_groups", 4, marks=pytest.mark.slow)])
def test_meta_llama_8b_prepares_every_unit_kind_and_exports_its_config(gqa, kv_heads):
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_8b_config()).eval()
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=dict(input_ids=ids)),
                             trace_fn=functools.partial(trace_channel_units, gqa=gqa))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.fx cannot trace HF Llama: recorded forward (warned)
        mutator.prepare_from_supernet(model)
    # one query-heads unit and one MLP unit per layer, one residual stream (embedding, norms, lm_head input)
    assert unit_kinds(mutator, model) == {"heads": LAYERS, "hidden": 1, "mlp": LAYERS}
    heads = [u for u in mutator.mutable_units if "self_attn.q_proj" in u.name]
    assert len(heads) == LAYERS and {u.num_channels for u in heads} == {32 if gqa == "keep_kv" else 8}
    mutator.set_global_ratio(0.5)
    small = mutator.export(model)
    config = small.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim) == (2048, 7168, 16, kv_heads, 128)
    assert model.config.hidden_size == 4096  # the supernet's config is not touched
    layer = small.model.layers[LAYERS - 1]
    assert all(p.is_meta for p in small.parameters())
    assert tuple(layer.self_attn.q_proj.weight.shape) == (16 * 128, 2048)
    assert tuple(layer.self_attn.k_proj.weight.shape) == (kv_heads * 128, 2048)
    assert tuple(layer.mlp.down_proj.weight.shape) == (2048, 7168)
    assert tuple(small.lm_head.weight.shape) == (128256, 2048)


def test_meta_norms_alike_are_probed_once_and_unlike_ones_again(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from pyprune.ops import served
    calls = []
    real = served._probe
    monkeypatch.setattr(served, "_probe", lambda module, kind: calls.append(module) or real(module, kind))
    monkeypatch.setattr(served, "_META_PROBES", {})
    with torch.device("meta"):
        norms = [LlamaRMSNorm(24, eps=1e-6), LlamaRMSNorm(24, eps=1e-6), LlamaRMSNorm(24, eps=1e-5),
                 LlamaRMSNorm(20, eps=1e-6)]
    probes = [served.serving_probe(norm) for norm in norms]
    assert all(p.ok and p.channel_dim == -1 for p in probes)
    # (the registry may probe a module once more with its kind while finding it: modules, not calls, are counted)
    assert list(dict.fromkeys(calls)) == [norms[0], norms[2], norms[3]]  # twins once; eps and width differ
    real_norm = LlamaRMSNorm(24, eps=1e-6)  # real tensors are probed with their own values, never by signature
    assert served.serving_probe(real_norm).ok and calls[-1] is real_norm
