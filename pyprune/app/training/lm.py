"""Language models in the main job: ``pyprune prune --model tiny-llama``.

``tiny-llama`` is a HF ``LlamaForCausalLM`` built from a small config (:data:`LANGUAGE_MODEL_CONFIGS`: hidden 128,
4 layers, 4 query heads over 2 KV heads, MLP 256, tied input / output embeddings, about 0.62 M parameters),
initialised from scratch (nothing is downloaded) and trained on byte tokens of the Python standard library's own
source (:mod:`pyprune.app.data.text_corpus`). Everything else is the classification job's (:class:`.job.Run`):
the run directory, checkpoints and ``--resume``, the pruning schedule, compact training, the report; what differs
is here:

* data: blocks of :data:`SEQ_LEN` tokens (:data:`QUICK_SEQ_LEN` with ``--quick``); ``--train-samples`` /
  ``--val-samples`` count blocks;
* loss: next-token cross-entropy over every position; optimizer AdamW (betas 0.9 / 0.95);
* metric: validation perplexity, ``exp`` of the mean next-token cross-entropy over every validation token (lower
  is better); rows hold ``perplexity`` and ``ppl_pruned`` (measured right after a pruning step, before any
  training at the new width); the summary names ``perplexity_pretrained``, ``perplexity_pruned`` (right after the
  last step, no recovery), ``perplexity_final`` (after recovery finetuning) and ``perplexity_exported``;
* outputs: besides pyprune's files, ``hf_model/`` (``save_pretrained`` of the exported model, which the ratio
  target keeps uniform across layers), reloaded with ``AutoModelForCausalLM.from_pretrained`` and checked to give
  the same logits before it is moved in. A width a Llama config cannot express leaves it out, with the reason in
  the summary.
"""
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ...errors import ConfigError
from ..data.loaders import shard_indices
from ..data.text_corpus import VOCAB_SIZE, stdlib_splits
from .job import Run, checked_difference
from .run_dir import HF_MODEL_DIR

SEQ_LEN, QUICK_SEQ_LEN = 128, 32  # tokens per block
HF_DIR = HF_MODEL_DIR
# The LlamaConfig arguments of each language model; the vocabulary is the corpus's (256 byte tokens).
LANGUAGE_MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {
    "tiny-llama": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
}


def build_language_model(name: str, vocab_size: int = VOCAB_SIZE) -> nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` of :data:`LANGUAGE_MODEL_CONFIGS` ``[name]`` (cache off: the job
    scores whole blocks). Unknown name -> ``ValueError``."""
    if name not in LANGUAGE_MODEL_CONFIGS:
        raise ValueError(f"unknown language model {name!r}: use one of {', '.join(LANGUAGE_MODEL_CONFIGS)}")
    import transformers
    config = transformers.LlamaConfig(vocab_size=vocab_size, use_cache=False, **LANGUAGE_MODEL_CONFIGS[name])
    return transformers.LlamaForCausalLM(config)


def logits_of(model: nn.Module, input_ids: Tensor) -> Tensor:
    """``int64 [N, T] -> [N, T, vocab]``: a causal LM's next-token logits (HF output or a plain tensor)."""
    output = model(input_ids=input_ids)
    return output if isinstance(output, Tensor) else output.logits


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` ``[N, T, V]`` against ``labels`` int64 ``[N, T]`` (already shifted: label
    ``t`` is the token after input ``t``)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"next_token_loss: logits [N, T, V] and labels [N, T] expected, got {logits.dtype} "
                         f"{list(logits.shape)} and {labels.dtype} {list(labels.shape)}")
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


@torch.no_grad()
def perplexity(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, rank: int = 0,
               world_size: int = 1) -> float:
    """``exp`` of the mean next-token cross-entropy over every token of ``dataset`` (items ``(input_ids,
    labels)``, int64 ``[T]`` each); under ``torch.distributed`` each rank scores its shard and the sums are added,
    so every rank returns the same number."""
    was_training = model.training
    model.eval()
    shard = Subset(dataset, shard_indices(len(dataset), rank, world_size))
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
    for input_ids, labels in DataLoader(shard, batch_size=batch_size):
        input_ids, labels = input_ids.to(device), labels.to(device)
        logits = logits_of(model, input_ids)
        totals[0] += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum").double()
        totals[1] += labels.numel()
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    loss, tokens = totals.tolist()
    return float(torch.tensor(loss / tokens).exp()) if tokens else float("nan")


class LanguageModelRun(Run):
    """The job for a causal language model (see the module docstring); built by :func:`.job.run_class`."""

    metric = "perplexity"

    def __init__(self, config, context):
        self.seq_len = QUICK_SEQ_LEN if config.quick else SEQ_LEN
        self.corpus: Dict[str, Any] = {}
        self.hf_result: Dict[str, Any] = {}
        super().__init__(config, context)

    # -------------------------------------------------------------------------------------------------- task
    def build_data(self):
        train, val, self.corpus = stdlib_splits(self.seq_len, self.config.train_samples, self.config.val_samples)
        return train, val, VOCAB_SIZE

    def example_input(self):
        return {"input_ids": torch.zeros(1, self.seq_len, dtype=torch.int64)}

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.wrapped.parameters(), lr=self.config.lr, betas=(0.9, 0.95),
                                 weight_decay=self.config.weight_decay)

    def step_functions(self) -> Dict[str, Any]:
        # self.step.model, not self.wrapped: a rebuilt DDP wrapper replaces the step's model
        return {"loss_fn": next_token_loss, "forward": lambda input_ids: logits_of(self.step.model, input_ids)}

    def score(self, model: Optional[nn.Module] = None) -> float:
        return perplexity(model or self.model, self.val_set, self.config.batch_size, self.device,
                          self.context.rank, self.context.world_size)

    def model_info(self) -> Dict[str, Any]:
        return {"name": self.config.model, "num_classes": self.num_classes, "task": "lm",
                "input_shape": [1, self.seq_len], "unit_type": self.config.unit_type}

    def resume_signature(self) -> Dict[str, Any]:
        return {**super().resume_signature(), "seq_len": self.seq_len}

    def task_summary(self) -> Dict[str, Any]:
        pruned = [r["ppl_pruned"] for r in self.rows if r.get("ppl_pruned") is not None]
        return {"task": "lm", "perplexity_pruned": pruned[-1] if pruned else None, "corpus": self.corpus,
                "python": sys.version.split()[0], **self.hf_result}

    def result_line(self, summary: Dict[str, Any]) -> str:
        return (f"perplexity {summary['perplexity_pretrained']:.2f} -> {summary['perplexity_pruned']:.2f} right "
                f"after pruning -> {summary['perplexity_final']:.2f} after finetuning (exported "
                f"{summary['perplexity_exported']:.2f}); params {summary['params_kept']:.1%} and FLOPs "
                f"{summary['flops_kept']:.1%} of the original; {summary['wall_s']:.0f} s; outputs in {self.out}")

    # ----------------------------------------------------------------------------------------------- outputs
    def val_ids(self, count: int = 8) -> Tensor:
        return torch.stack([self.val_set[i][0] for i in range(min(count, len(self.val_set)))]).to(self.device)

    @torch.no_grad()
    def verify_reload(self, directory: Path) -> float:
        """Reload pyprune's files and compare logits (as the classification job does), then write the HF export
        to ``directory/hf_model`` and check that ``from_pretrained`` reloads it to the same logits."""
        from .pruned_run import load_pruned_run
        ids = self.val_ids()
        expected = logits_of(self.model.eval(), ids)
        reloaded = load_pruned_run(directory, map_location=self.device).to(self.device)
        difference = checked_difference(expected, logits_of(reloaded, ids), "the reloaded pruned model")
        self.hf_result = self.write_hf_model(directory / HF_DIR, ids, expected)
        self.task_outputs = (HF_DIR,) if self.hf_result["hf_model"] else ()
        return difference

    def write_hf_model(self, target: Path, ids: Tensor, expected: Tensor) -> Dict[str, Any]:
        """``save_pretrained`` of the export into ``target`` and its ``from_pretrained`` check; a refused save
        (widths a Llama config cannot express) is reported, not raised."""
        import transformers
        exported = self.mutator.export(self.model).eval()
        try:
            exported.save_pretrained(target)
        except ConfigError as error:
            return {"hf_model": None, "hf_save_refused": str(error).splitlines()[0]}
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(target).to(self.device).eval()
        difference = checked_difference(expected, logits_of(reloaded, ids), f"{HF_DIR} (from_pretrained)")
        config = reloaded.config
        return {"hf_model": HF_DIR, "hf_reload_max_abs_diff": difference,
                "hf_config": {key: getattr(config, key) for key in ("hidden_size", "intermediate_size",
                                                                     "num_attention_heads", "num_key_value_heads",
                                                                     "head_dim", "num_hidden_layers")}}


__all__ = ["LANGUAGE_MODEL_CONFIGS", "SEQ_LEN", "QUICK_SEQ_LEN", "build_language_model", "logits_of",
           "next_token_loss", "perplexity", "LanguageModelRun"]
