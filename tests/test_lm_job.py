"""The language-model job (``pyprune prune --model tiny-llama``): the standard-library text corpus, the job end to
end with perplexities in every output, ``--resume`` continuing to the same result, and the HF export reloading with
``from_pretrained`` to the same logits.

The job tests run a narrower model than tiny-llama (same family and GQA layout, hidden 32, 2 layers) on a few
blocks, so that they take seconds: what they check is the job's plumbing, not the model. Tolerance for reloads:
the same tensors in the same order, atol 1e-5.
"""
import csv
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pyprune.app.data import text_corpus  # noqa: E402
from pyprune.app.data.text_corpus import TokenBlocks, corpus_files, decode, encode, stdlib_splits  # noqa: E402
from pyprune.app.training import lm  # noqa: E402
from pyprune.app.training.config import JobConfig, prepare_output_dir  # noqa: E402
from pyprune.app.training.job import run_prune_job  # noqa: E402
from pyprune.app.training.pruned_run import load_pruned_run  # noqa: E402
from pyprune.errors import ConfigError  # noqa: E402

# fx cannot trace HF Llama (a recorded forward is used), which is warned; the tied embeddings train compact
pytestmark = [pytest.mark.filterwarnings("ignore:torch.fx could not trace"),
              pytest.mark.filterwarnings("error:compact_training.*shares tensors")]

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, tie_word_embeddings=True)
JOB = dict(model="tiny-llama", quick=True, train_samples=32, val_samples=8, batch_size=8, no_progress=True,
           threads=1)


# ------------------------------------------------------------------------------------------------------ corpus
def test_corpus_is_the_sorted_stdlib_split_by_file_and_the_same_every_time():
    train, val = corpus_files()
    assert train == corpus_files()[0] and val == corpus_files()[1]
    every = sorted(train + val)
    assert not set(train) & set(val) and len(val) == len(every) // 10
    assert val == every[9::10] and all(p.parent == text_corpus.stdlib_folder() for p in every)
    a_train, a_val, info = stdlib_splits(16, 20, 5)
    b_train, b_val, again = stdlib_splits(16, 20, 5)
    assert info == again and info["train_files"] == len(train) and info["val_blocks"] == 5
    for first, second in ((a_train, b_train), (a_val, b_val)):
        assert [torch.equal(x[0], y[0]) for x, y in zip(first, second)] == [True] * len(first)


def test_blocks_are_shifted_byte_tokens_spread_over_the_text():
    text = "def f(x):\n    return x  # é\n" * 8
    tokens = encode(text)
    assert tokens.dtype == torch.uint8 and decode(tokens) == text
    every = TokenBlocks(tokens, 10)
    assert len(every) == (tokens.numel() - 1) // 10 and every.starts[:3].tolist() == [0, 10, 20]
    some = TokenBlocks(tokens, 10, num_blocks=3)
    assert some.starts[0] == 0 and some.starts[-1] == tokens.numel() - 11  # first and last block of the text
    input_ids, labels = some[1]
    assert input_ids.dtype == torch.int64 and input_ids.shape == labels.shape == (10,)
    assert torch.equal(input_ids[1:], labels[:-1])
    with pytest.raises(ValueError, match=r"asked for 999 blocks of 10 tokens, the text holds \d+"):
        TokenBlocks(tokens, 10, num_blocks=999)
    with pytest.raises(ValueError, match="fewer than one block"):
        TokenBlocks(tokens[:5], 10)


def test_a_folder_with_too_few_files_is_refused(tmp_path):
    for i in range(3):
        (tmp_path / f"m{i}.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"holds 3 \*\.py files, at least 10"):
        corpus_files(tmp_path)


# --------------------------------------------------------------------------------------------------- the model
def test_tiny_llama_is_a_gqa_llama_over_byte_tokens():
    model = lm.build_language_model("tiny-llama")
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and config.vocab_size == text_corpus.VOCAB_SIZE
    assert (config.num_attention_heads, config.num_key_value_heads, config.hidden_size) == (4, 2, 128)
    ids = torch.randint(0, 256, (2, 8))
    logits = lm.logits_of(model, ids)
    assert logits.shape == (2, 8, 256)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids.reshape(-1))
    torch.testing.assert_close(lm.next_token_loss(logits, ids), expected)
    with pytest.raises(ValueError, match=r"logits \[N, T, V\] and labels \[N, T\] expected"):
        lm.next_token_loss(logits, ids[:, :4])


def test_language_model_options_are_checked():
    config = JobConfig(model="tiny-llama")
    assert config.task == "lm" and config.lr == 3e-3
    assert JobConfig().task == "classification" and JobConfig().lr == 0.1
    with pytest.raises(ConfigError, match="--channels-last does not apply to the language model 'tiny-llama'"):
        JobConfig(model="tiny-llama", channels_last=True)


# ------------------------------------------------------------------------------------------------------ the job
@pytest.fixture
def small_model(monkeypatch):
    monkeypatch.setitem(lm.LANGUAGE_MODEL_CONFIGS, "tiny-llama", SMALL)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted run of the small model (shared by the tests that read it)."""
    out = tmp_path_factory.mktemp("lm") / "run"
    prepare_output_dir(str(out))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(lm.LANGUAGE_MODEL_CONFIGS, "tiny-llama", SMALL)
        summary = run_prune_job(JobConfig(output_dir=str(out), **JOB))
    return out, summary


def test_the_job_writes_perplexities_and_an_hf_model_that_reloads(finished_run, small_model):
    out, summary = finished_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary and summary["task"] == "lm"
    for key in ("perplexity_pretrained", "perplexity_pruned", "perplexity_final", "perplexity_exported"):
        assert math.isfinite(summary[key]) and 1.0 < summary[key] < 256 * 4, key  # 256: a uniform guess
    assert summary["perplexity_exported"] == pytest.approx(summary["perplexity_final"], rel=1e-4)
    assert summary["params_kept"] < 0.5 and summary["corpus"]["seq_len"] == lm.QUICK_SEQ_LEN
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert "perplexity" in rows[0] and "ppl_pruned" in rows[0] and "accuracy" not in rows[0]
    assert [r["phase"] for r in rows] == ["pretrained", "prune", "prune", "finetuned"]
    assert float(rows[-2]["ppl_pruned"]) == pytest.approx(summary["perplexity_pruned"])
    assert (out / "pruning_curve.png").read_bytes()[:4] == b"\x89PNG"

    # pyprune's files and the HF folder reload to the same model
    assert summary["hf_model"] == "hf_model" and summary["hf_config"]["hidden_size"] == SMALL["hidden_size"] // 2
    ids = torch.randint(0, 256, (2, lm.QUICK_SEQ_LEN), generator=torch.Generator().manual_seed(0))
    pruned = load_pruned_run(out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out / "hf_model").eval()
    assert reloaded.config.num_attention_heads == 2 and reloaded.config.num_key_value_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(lm.logits_of(reloaded, ids), lm.logits_of(pruned, ids), rtol=0, atol=1e-5)


def test_a_stopped_run_resumes_to_the_same_result(finished_run, small_model, tmp_path):
    _, uninterrupted = finished_run
    config = dict(output_dir=str(tmp_path / "run"), **JOB)
    prepare_output_dir(config["output_dir"])
    assert run_prune_job(JobConfig(max_iterations=6, **config)) == {"stopped_at": 6}
    assert not (tmp_path / "run" / "summary.json").exists()
    resumed = run_prune_job(JobConfig(resume="auto", **config))
    for key in ("perplexity_pretrained", "perplexity_pruned", "perplexity_final", "params_after"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5), key
    with pytest.raises(ValueError, match=r"made with other options: seed"):
        run_prune_job(JobConfig(resume="auto", overwrite=True, **dict(config, seed=1)))
