"""The language models of ``pyprune bench models``: a Llama-style causal LM timed like the image classifiers.

``llama`` is a HF ``LlamaForCausalLM`` built from :data:`LLAMA_CONFIG` (hidden 256, 4 layers, 8 query heads over
4 KV heads, MLP 688, a 512-token vocabulary, input and output embeddings tied as in ``pyprune prune --model
tiny-llama``; about 2.8 M parameters), freshly initialised, nothing downloaded. The bench feeds it token ids
``int64 [N, T]`` and trains it on the next-token loss.

:class:`FlatLogits` wraps it so that the benchmark's classifier machinery runs it unchanged: its forward returns
the logits flattened to ``[N * T, vocab]``, so ``F.cross_entropy(logits, labels.flatten())`` *is* the LM loss of
:func:`pyprune.app.training.lm.next_token_loss`, and the same wrapper (exported by ``mutator.export``) is the
exported model.
"""
from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from ..training.lm import logits_of

__all__ = ["LANGUAGE_MODELS", "LLAMA_CONFIG", "FlatLogits", "is_language_model", "build_language_model",
           "vocab_size_of", "token_batch"]

# The LlamaConfig arguments of the benchmark's Llama (GQA: two query heads per KV head).
LLAMA_CONFIG: Dict[str, Any] = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                                    tie_word_embeddings=True)
LANGUAGE_MODELS: Dict[str, Dict[str, Any]] = {"llama": LLAMA_CONFIG}


class FlatLogits(nn.Module):
    """``input_ids`` int64 ``[N, T]`` -> next-token logits ``[N * T, vocab]`` of the causal LM ``lm``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return logits_of(self.lm, input_ids).flatten(0, 1)


def is_language_model(name: str) -> bool:
    return name in LANGUAGE_MODELS


def build_language_model(name: str) -> FlatLogits:
    """The freshly initialised model ``name`` of :data:`LANGUAGE_MODELS` (cache off: whole blocks are scored)."""
    import transformers
    config = transformers.LlamaConfig(use_cache=False, **LANGUAGE_MODELS[name])
    return FlatLogits(transformers.LlamaForCausalLM(config))


def vocab_size_of(name: str) -> int:
    return LANGUAGE_MODELS[name]["vocab_size"]


def token_batch(name: str, batch: int, seq_len: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """``(input_ids [batch, seq_len], labels [batch * seq_len])``: random tokens, the labels the next ones."""
    tokens = torch.randint(0, vocab_size_of(name), (batch, seq_len + 1), device=device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].flatten()
