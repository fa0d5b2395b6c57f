"""The transformers zoo of the coverage sweep: one small model of every family, built from a config (no download).

Each family is a tiny config of the real architecture (2 layers, 64-wide residual stream, 4 heads, a 128-wide MLP,
a 128-token vocabulary) and the model head a user prunes it with (``*ForCausalLM`` / ``*ForMaskedLM`` /
``*ForImageClassification`` / the encoder-decoder's ``*ForConditionalGeneration``), with a keyword demo input it
takes (``input_ids``; ``decoder_input_ids`` for T5 and Whisper; ``input_features`` for Whisper, ``pixel_values``
for the vision models, both for CLIP). ``gqa`` is the grouped-query mode the family is traced with
(:data:`pyprune.tracing.heads.GQA_MODES`), ``auto`` the ``transformers`` class ``from_pretrained`` reloads it with.
"""
import functools
import math
import tempfile
import time
import traceback
import warnings
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch
from torch import nn

from ...errors import ConfigError
from ...tracing.example_inputs import CallArgs, call_model, tensor_leaves

__all__ = ["HFFamily", "FAMILIES", "HF_COLUMNS", "family_names", "build_family", "sweep_family", "unit_kind",
           "unit_kinds", "train_changes_loss", "reload_difference", "llama_8b_config"]

VOCAB = 128
BATCH, TOKENS, IMAGE = 2, 8, 32
_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
_DECODER = dict(_SMALL, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)


class HFFamily(NamedTuple):
    make: Callable  # () -> (model, CallArgs)
    auto: str  # the Auto class that reloads a saved export
    gqa: str = "keep_kv"


def _ids(*shape) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape or (BATCH, TOKENS))


def _text(model) -> tuple:
    return model, CallArgs((), {"input_ids": _ids()})


def _pixels(model, size: int = IMAGE) -> tuple:
    return model, CallArgs((), {"pixel_values": torch.randn(BATCH, 3, size, size)})


def _bert():
    import transformers as t
    return _text(t.BertForMaskedLM(t.BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **_SMALL)))


def _roberta():
    import transformers as t
    return _text(t.RobertaForMaskedLM(t.RobertaConfig(vocab_size=VOCAB, max_position_embeddings=64,
                                                      pad_token_id=1, **_SMALL)))


def _distilbert():
    import transformers as t
    return _text(t.DistilBertForMaskedLM(t.DistilBertConfig(vocab_size=VOCAB, max_position_embeddings=64, dim=64,
                                                            n_layers=2, n_heads=4, hidden_dim=128)))


def _gpt2():
    import transformers as t
    return _text(t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                                n_inner=128)))


def _llama(kv_heads: int):
    def make():
        import transformers as t
        return _text(t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=kv_heads, **_DECODER)))
    return make


def _qwen2():
    import transformers as t
    return _text(t.Qwen2ForCausalLM(t.Qwen2Config(num_key_value_heads=2, **_DECODER)))


def _qwen3():
    import transformers as t
    return _text(t.Qwen3ForCausalLM(t.Qwen3Config(num_key_value_heads=2, head_dim=16, **_DECODER)))


def _mistral():
    import transformers as t
    return _text(t.MistralForCausalLM(t.MistralConfig(num_key_value_heads=2, sliding_window=None, **_DECODER)))


def _phi3():
    import transformers as t
    return _text(t.Phi3ForCausalLM(t.Phi3Config(num_key_value_heads=2, pad_token_id=0, **_DECODER)))


def _gemma():
    import transformers as t
    return _text(t.GemmaForCausalLM(t.GemmaConfig(num_key_value_heads=2, head_dim=16, **dict(
        _DECODER, tie_word_embeddings=True))))


def _t5():
    import transformers as t
    model = t.T5ForConditionalGeneration(t.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                    num_decoder_layers=2, num_heads=4, decoder_start_token_id=0))
    return model, CallArgs((), {"input_ids": _ids(), "decoder_input_ids": _ids(BATCH, 4)})


def _vit():
    import transformers as t
    return _pixels(t.ViTForImageClassification(t.ViTConfig(image_size=IMAGE, patch_size=8, num_labels=10,
                                                           **_SMALL)))


def _clip():
    import transformers as t
    text = dict(vocab_size=VOCAB, max_position_embeddings=16, **_SMALL)
    vision = dict(image_size=IMAGE, patch_size=8, **_SMALL)
    model = t.CLIPModel(t.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    return model, CallArgs((), {"input_ids": _ids(), "pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE)})


def _swin():
    import transformers as t
    return _pixels(t.SwinForImageClassification(t.SwinConfig(image_size=IMAGE, patch_size=2, embed_dim=32,
                                                             depths=[2, 2], num_heads=[2, 4], window_size=4,
                                                             num_labels=10)))


def _whisper():
    import transformers as t
    config = t.WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                             decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16, max_target_positions=16,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = t.WhisperForConditionalGeneration(config)
    return model, CallArgs((), {"input_features": torch.randn(BATCH, 16, 32), "decoder_input_ids": _ids(BATCH, 4)})


FAMILIES: Dict[str, HFFamily] = {
    "bert": HFFamily(_bert, "AutoModelForMaskedLM"),
    "roberta": HFFamily(_roberta, "AutoModelForMaskedLM"),
    "distilbert": HFFamily(_distilbert, "AutoModelForMaskedLM"),
    "gpt2": HFFamily(_gpt2, "AutoModelForCausalLM"),
    "llama-mha": HFFamily(_llama(4), "AutoModelForCausalLM"),
    "llama-gqa": HFFamily(_llama(2), "AutoModelForCausalLM"),
    "qwen2": HFFamily(_qwen2, "AutoModelForCausalLM"),
    "qwen3": HFFamily(_qwen3, "AutoModelForCausalLM"),
    "mistral": HFFamily(_mistral, "AutoModelForCausalLM"),
    "phi3": HFFamily(_phi3, "AutoModelForCausalLM"),
    "gemma": HFFamily(_gemma, "AutoModelForCausalLM"),
    "t5": HFFamily(_t5, "AutoModelForSeq2SeqLM"),
    "vit": HFFamily(_vit, "AutoModelForImageClassification"),
    "clip": HFFamily(_clip, "AutoModel"),
    "swin": HFFamily(_swin, "AutoModelForImageClassification"),
    "whisper": HFFamily(_whisper, "AutoModelForSpeechSeq2Seq"),
}


def llama_8b_config(**overrides):
    """The sizes of Llama-3-8B (hidden 4096, MLP 14336, 32 layers, 32 query / 8 key-value heads of 128, vocabulary
    128256), as a ``LlamaConfig`` built here (no download); build the model under ``torch.device('meta')``."""
    import transformers
    sizes = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                 rope_theta=500000.0, tie_word_embeddings=False)
    return transformers.LlamaConfig(**dict(sizes, **overrides))


def family_names() -> List[str]:
    return list(FAMILIES)


def build_family(name: str):
    """(model in eval mode, CallArgs) of family ``name``."""
    model, inputs = FAMILIES[name].make()
    return model.eval(), inputs


# ---------------------------------------------------------------------------------------------------- sweep row
HF_COLUMNS = ("model", "status", "parse_s", "units", "mutable", "heads", "hidden", "mlp", "params_M", "params_kept",
              "non_embedding_kept", "max_rel_diff", "trains", "reload", "time_s")
RELOAD_TOL = 1e-5  # a reload computes with the same tensors in the same order as the export


def unit_kind(unit, model) -> str:
    """``'heads'`` (its channels are whole heads: a layer range with ``expand > 1``), ``'hidden'`` (the residual
    stream: an embedding table or a norm over the channel dim is in it) or ``'mlp'`` (any other width)."""
    refs = list(unit.output_related) + list(unit.input_related)
    if any(ref.expand > 1 for ref in refs):
        return "heads"
    for ref in refs:
        try:
            module = model.get_submodule(ref.name)
        except AttributeError:
            continue
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            return "hidden"
    return "mlp"


def unit_kinds(mutator, model) -> Dict[str, int]:
    """``{'heads': n, 'hidden': n, 'mlp': n}``: the mutable units of a prepared ``mutator`` by :func:`unit_kind`."""
    kinds = [unit_kind(u, model) for u in mutator.mutable_units]
    return {kind: kinds.count(kind) for kind in ("heads", "hidden", "mlp")}


def embedding_params(model: nn.Module) -> int:
    """Parameters of the model's ``nn.Embedding`` tables (shared tensors once)."""
    seen = {id(p): p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in seen.values())


def main_output(output) -> torch.Tensor:
    """The logits of an HF output (``logits``, CLIP's ``logits_per_image``), else its first float tensor."""
    for key in ("logits", "logits_per_image"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return next(t for t in tensor_leaves(output) if t.is_floating_point())


def _loss(model: nn.Module, inputs: CallArgs) -> torch.Tensor:
    return main_output(call_model(model, inputs)).float().square().mean()


def train_changes_loss(model: nn.Module, inputs: CallArgs, lr: float = 0.05) -> Tuple[float, float]:
    """One SGD step (train mode, dropout on) on ``mean(logits ** 2)``; that loss in eval mode before and after."""
    model.eval()
    with torch.no_grad():
        before = float(_loss(model, inputs))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    _loss(model, inputs).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = float(_loss(model, inputs))
    return before, after


def reload_difference(exported: nn.Module, inputs: CallArgs, auto: str) -> float:
    """``save_pretrained`` + ``transformers.<auto>.from_pretrained``: max |reloaded - export| of the logits
    (ConfigError from ``save_pretrained`` where the family's config cannot hold the widths)."""
    import transformers
    with tempfile.TemporaryDirectory() as directory:
        exported.save_pretrained(directory)
        reloaded = getattr(transformers, auto).from_pretrained(directory).eval()
    if type(reloaded) is not type(exported):
        raise AssertionError(f"{auto} reloaded a {type(reloaded).__name__}, not a {type(exported).__name__}")
    with torch.no_grad():
        return float((main_output(call_model(reloaded, inputs)) - main_output(call_model(exported, inputs)))
                     .abs().max())


def _kept_shares(model: nn.Module, pruned: nn.Module) -> Tuple[float, float]:
    """(parameters of ``pruned`` / of ``model``, the same without the embedding tables)."""
    from ...mutators import count_params
    before, kept = count_params(model), count_params(pruned)
    return kept / before, (kept - embedding_params(pruned)) / (before - embedding_params(model))


def sweep_family(name: str, ratio: float = 0.5) -> Dict[str, object]:
    """One row of :data:`HF_COLUMNS`: prepare with the keyword demo input, every unit at ``ratio`` (one width per
    role, the default path), export == dynamic, parameters kept, one optimizer step of the export changes its loss,
    and ``save_pretrained`` -> ``from_pretrained`` gives the export's logits. Where the config cannot hold the
    ratio's widths, the reload is tried on the export with the units one config field governs tied
    (``tie_uniform_widths(mutator, model=model)``; T5's self-attention heads with its cross-attention's, which do
    not prune), and ``reload`` names that export's non-embedding share."""
    from ...mutators import ChannelMutator, count_params
    from ...mutators.hf_export import HF_SAVE_REFUSED, tie_uniform_widths
    from ...tracing import trace_channel_units
    from ...tracing.outputs import fixed_output_values
    from .sweep import output_difference
    row: Dict[str, object] = {"model": name}
    start = time.perf_counter()
    try:
        family = FAMILIES[name]
        torch.manual_seed(0)
        model, inputs = build_family(name)
        trace = functools.partial(trace_channel_units, gqa=family.gqa)
        mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=inputs.kwargs), trace_fn=trace)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mutator.prepare_from_supernet(model)
        row["parse_s"] = time.perf_counter() - start
        row.update(units=len(mutator.units), mutable=len(mutator.mutable_units), **unit_kinds(mutator, model))
        mutator.set_global_ratio(ratio)
        pruned = mutator.export(model).eval()
        with torch.no_grad():
            dynamic = call_model(model, inputs)
        with torch.no_grad():
            # on the outputs that keep their shape (the tracer's default frees auxiliary ones, e.g. T5's
            # encoder_last_hidden_state, which come out narrower)
            exported = fixed_output_values(call_model(pruned, inputs))
            row["max_rel_diff"] = f"{output_difference(exported, fixed_output_values(dynamic)):.1e}"
        kept_share = functools.partial(_kept_shares, model)
        row["params_M"] = count_params(model) / 1e6
        row["params_kept"], row["non_embedding_kept"] = kept_share(pruned)
        reloadable, note = pruned, ""
        if hasattr(pruned, HF_SAVE_REFUSED):
            untied = mutator.current_choices
            tie_uniform_widths(mutator, model=model)
            tied = mutator.export(model).eval()
            mutator.set_choices(untied)
            if not hasattr(tied, HF_SAVE_REFUSED):
                reloadable, note = tied, f" (tied widths: {kept_share(tied)[1]:.2f} non-embedding kept)"
        try:
            difference = reload_difference(reloadable, inputs, family.auto)
            row["reload"] = ("yes" if difference <= RELOAD_TOL else f"differs by {difference:.1e}") + note
        except ConfigError as error:
            row["reload"] = "refused: " + str(error).replace("save_pretrained refused: ", "")[:200]
        loss_before, loss_after = train_changes_loss(pruned, inputs)
        row["trains"] = "yes" if loss_after != loss_before and math.isfinite(loss_after) else \
            f"loss {loss_before:.4g} -> {loss_after:.4g}"
        row["status"] = "ok"
    except Exception as error:  # a row per model, whatever happens
        row["status"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        row["traceback"] = traceback.format_exc()
    row["time_s"] = time.perf_counter() - start
    return row
