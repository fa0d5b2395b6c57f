"""The transformers zoo of ``pyprune bench sweep --zoo transformers`` on a representative subset (BERT and
DistilBERT with its own config names, GPT-2's Conv1D, a GQA Llama, Qwen3's q / k RMSNorm over the head dim, Gemma's
scaled embedding, Phi-3's sliced fused qkv_proj, ViT's patch embedding):
at ratio 0.5 heads, hidden size and MLP prune, at most 35 % of the non-embedding parameters stay, the export equals
the dynamic model (1e-4 of the output scale), one optimizer step of the export changes its loss, and the export
reloads with ``from_pretrained`` to the same logits (atol 1e-5; Gemma's ``sqrt(hidden_size)`` embedding scale
folded into its weights). The whole zoo runs in the sweep (benchmarks/RESULTS.md)."""
import pytest

pytest.importorskip("transformers")

from pyprune.app.bench import sweep, zoos  # noqa: E402
from pyprune.app.bench.transformers_zoo import HF_COLUMNS, family_names  # noqa: E402

SUBSET = ["bert", "distilbert", "gpt2", "llama-gqa", "qwen3", "phi3", "gemma", "vit"]


def test_the_zoo_lists_every_family_and_has_its_own_columns():
    assert {"bert", "roberta", "distilbert", "gpt2", "llama-mha", "llama-gqa", "qwen2", "qwen3", "mistral", "phi3",
            "gemma", "t5", "vit", "clip", "swin", "whisper"} <= set(family_names())
    assert zoos.zoo_names("transformers") == family_names() and sweep.columns("transformers") == HF_COLUMNS


@pytest.mark.parametrize("name", SUBSET)
def test_family_prunes_heads_hidden_and_mlp_and_its_export_trains_and_reloads(name):
    row = sweep.sweep_model(name, 0.5, "transformers")
    assert row["status"] == "ok", row.get("traceback")
    assert row["heads"] >= 2 and row["hidden"] == 1 and row["mlp"] >= 2  # one unit of each per layer
    assert row["non_embedding_kept"] <= 0.35 and row["params_kept"] < 0.4
    assert float(row["max_rel_diff"]) <= 1e-4
    assert row["trains"] == "yes"
    assert row["reload"] == "yes"


def test_a_family_whose_config_needs_tied_widths_reloads_the_tied_export():
    # T5's one num_heads holds its cross-attention heads, which do not prune: the ratio's export (self-attention
    # heads at 2) is not expressible, the tied one is, and the row says what the tie keeps
    row = sweep.sweep_model("t5", 0.5, "transformers")
    assert row["status"] == "ok" and float(row["max_rel_diff"]) <= 1e-4 and row["trains"] == "yes"
    assert row["non_embedding_kept"] <= 0.35
    assert row["reload"].startswith("yes (tied widths: ") and "non-embedding kept" in row["reload"]


def test_a_composite_config_writes_its_sub_configs_and_reloads():
    # CLIP's widths live in text_config / vision_config; both towers prune heads, hidden size and MLP (the text
    # tower's end-of-sequence gather indexes other dims than the channels), so the ratio's export itself reloads
    row = sweep.sweep_model("clip", 0.5, "transformers")
    assert row["status"] == "ok" and float(row["max_rel_diff"]) <= 1e-4 and row["trains"] == "yes"
    assert row["hidden"] == 2 and row["non_embedding_kept"] <= 0.35 and row["reload"] == "yes"
