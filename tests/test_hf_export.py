"""Exports of HF models that stay HF models: uniform widths write a config that ``save_pretrained`` +
``AutoModel*.from_pretrained`` reload to the same logits; widths that differ between layers (or that a family's
config cannot express) are refused by ``save_pretrained`` with the reason, and round-trip through
``save_pruned`` / ``load_pruned`` instead. Tiny configs, no download.

Tolerance: a reloaded model computes with the same tensors in the same order as the export, so atol 1e-5.
"""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_layers import VOCAB, _bert_mlm, _gpt2, _llama  # noqa: E402
from pyprune.errors import ChannelSelectionError, ConfigError  # noqa: E402
from pyprune.mutators import ChannelMutator, load_pruned, save_pruned  # noqa: E402
from pyprune.mutators import hf_export, hf_fields  # noqa: E402

RELOAD_TOL = dict(rtol=0, atol=1e-5)
MLP_ROLE = "model.layers.*.mlp.gate_proj_(0, 128)_128"


def _prepared(make, fixed=()):
    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=dict(input_ids=ids)), fixed=fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention views not mapped: warned, fixed
        mutator.prepare_from_supernet(model)
    return model, mutator, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


CASES = {  # name: (builder, fixed modules, Auto class, {config key: value after ratio 0.5})
    "llama": (_llama, (), "AutoModelForCausalLM", {"hidden_size": 32, "intermediate_size": 64}),
    "llama tied": (lambda: _llama(tied=True), (), "AutoModelForCausalLM",
                   {"hidden_size": 32, "intermediate_size": 64}),
    # BERT's and GPT-2's configs derive the head width from hidden_size / heads: these keep hidden size and
    # attention whole and prune the MLP, which any build can express
    "bert": (_bert_mlm, ("bert.embeddings.word_embeddings", "bert.encoder.layer.0.attention",
                         "bert.encoder.layer.1.attention"), "AutoModelForMaskedLM", {"intermediate_size": 64}),
    "gpt2": (_gpt2, ("transformer.wte", "transformer.h.0.attn", "transformer.h.1.attn"), "AutoModelForCausalLM",
             {"n_inner": 128}),
}


def _query_width(model):
    attention = model.get_submodule("model.layers.0.self_attn" if hasattr(model, "model") else
                                    "bert.encoder.layer.0.attention.self")
    return (attention.q_proj if hasattr(attention, "q_proj") else attention.query).out_features


@pytest.mark.parametrize("case", list(CASES))
def test_uniform_export_carries_its_widths_and_reloads_with_from_pretrained(case, tmp_path):
    make, fixed, auto, expected = CASES[case]
    model, mutator, ids = _prepared(make, fixed)
    mutator.set_global_ratio(0.5)
    assert hf_export.is_uniform(mutator)
    small = mutator.export(model)
    for key, value in expected.items():
        assert getattr(small.config, key) == value and getattr(model.config, key) != value
    if case.startswith("llama"):  # heads prune (q width drops) or not; the config says which either way
        head_dim = small.config.head_dim
        assert small.config.num_attention_heads * head_dim == _query_width(small)
        assert small.config.num_key_value_heads * head_dim == small.model.layers[0].self_attn.k_proj.out_features
    else:
        assert small.config.num_attention_heads == model.config.num_attention_heads
    expected_logits = _logits(small, ids)
    torch.testing.assert_close(expected_logits, _logits(model, ids), rtol=0, atol=1e-4)
    small.save_pretrained(tmp_path)
    reloaded = getattr(transformers, auto).from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(small)
    torch.testing.assert_close(_logits(reloaded, ids), expected_logits, **RELOAD_TOL)
    if case == "llama tied":
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_attention_modules_share_the_new_config():
    model, mutator, _ = _prepared(_llama)
    mutator.set_global_ratio(0.5)
    small = mutator.export(model)
    assert small.model.layers[1].self_attn.config is small.config and model.config.hidden_size == 64


def test_hidden_size_a_config_cannot_express_keeps_the_export_and_refuses_its_save(tmp_path):
    model, mutator, ids = _prepared(_bert_mlm)
    mutator.set_global_ratio(0.5)
    # hidden pruned, attention heads whole (64-wide q/k/v on a 32-wide stream): BERT derives the head width from
    # hidden_size / heads, so no BertConfig holds this
    heads = [u for u in mutator.mutable_units if any(r.name.endswith("attention.self.query")
                                                     for r in u.output_related)]
    mutator.set_choices({u.name: u.max_choice for u in heads})
    small = mutator.export(model)
    assert _query_width(small) == 64 and small.bert.embeddings.word_embeddings.embedding_dim == 32
    torch.testing.assert_close(_logits(small, ids), _logits(model, ids), rtol=0, atol=1e-4)
    assert small.config.hidden_size == 64  # the old config is kept: nothing claims widths it does not have
    with pytest.raises(ConfigError, match=r"attention\.self\.query\.weight is \[64, 32\] in the export.*save_pruned"):
        small.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def _non_uniform_llama():
    model, mutator, ids = _prepared(_llama)
    mutator.set_global_ratio(0.5)
    mutator.set_choices({"model.layers.1.mlp.gate_proj_(0, 128)_128": 96})
    return model, mutator, ids


def test_non_uniform_widths_are_found_and_their_save_pretrained_names_the_role(tmp_path):
    model, mutator, ids = _non_uniform_llama()
    assert not hf_export.is_uniform(mutator)
    assert hf_export.non_uniform_roles(mutator) == {MLP_ROLE: [64, 96]}
    small = mutator.export(model)
    torch.testing.assert_close(_logits(small, ids), _logits(model, ids), rtol=0, atol=1e-4)  # export still works
    with pytest.raises(ConfigError, match=r"not uniform across layers: model\.layers\.\*\.mlp\.\w+_proj\.weight "
                                          r".*tie_uniform_widths"):
        small.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def test_non_uniform_widths_round_trip_through_save_pruned(tmp_path):
    model, mutator, ids = _non_uniform_llama()
    small = mutator.export(model)
    save_pruned(tmp_path, model, mutator, exported=small)
    torch.manual_seed(1)  # another initialisation: the weights must come from the file
    loaded = load_pruned(_llama().eval(), tmp_path / "structure.json", tmp_path / "pruned_model.pt")
    assert loaded.model.layers[1].mlp.up_proj.out_features == 96
    torch.testing.assert_close(_logits(loaded, ids), _logits(small, ids), rtol=0, atol=0)


def test_tie_uniform_widths_makes_a_role_keep_one_count_and_the_export_saves(tmp_path):
    model, mutator, ids = _non_uniform_llama()
    assert hf_export.tie_uniform_widths(mutator, reduce="max")[MLP_ROLE] == 96
    assert hf_export.is_uniform(mutator)
    small = mutator.export(model)
    assert small.config.intermediate_size == 96
    small.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(small, ids), **RELOAD_TOL)
    with pytest.raises(ConfigError, match="reduce must be 'max' or 'min'"):
        hf_export.tie_uniform_widths(mutator, reduce="mean")


def test_one_uniform_choice_drives_every_unit_of_its_role_and_a_bad_one_changes_nothing():
    _, mutator, _ = _prepared(_llama)
    roles = hf_export.uniform_roles(mutator)
    assert [u.name for u in roles[MLP_ROLE]] == [f"model.layers.{i}.mlp.gate_proj_(0, 128)_128" for i in (0, 1)]
    hf_export.set_uniform_choices(mutator, {MLP_ROLE: 40})
    assert [u.active_channels for u in roles[MLP_ROLE]] == [40, 40]
    with pytest.raises(ConfigError, match=r"unknown roles \['model.layers.\*.mlp.nothing'\]"):
        hf_export.set_uniform_choices(mutator, {MLP_ROLE: 8, "model.layers.*.mlp.nothing": 8})
    assert [u.active_channels for u in roles[MLP_ROLE]] == [40, 40]


def test_role_of_replaces_layer_indices_only():
    assert hf_export.role_of("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"
    assert hf_export.role_of("transformer.h.0.attn.c_attn_(0, 64)_64") == "transformer.h.*.attn.c_attn_(0, 64)_64"
    assert hf_export.role_of("blocks.3_(0, 8)_8") == "blocks.*_(0, 8)_8"
    assert hf_export.role_of("fc2.weight") == "fc2.weight"


def test_pruned_heads_are_written_into_the_config_when_heads_prune(tmp_path):
    model, mutator, ids = _prepared(_llama)
    heads = [u for u in mutator.mutable_units if any("q_proj" in r.name for r in u.output_related)]
    if not heads:
        pytest.skip("attention heads are not prunable in this build: nothing to write")
    mutator.set_global_ratio(0.5)
    small = mutator.export(model)
    q = small.model.layers[0].self_attn.q_proj.out_features
    assert small.config.num_attention_heads * small.config.head_dim == q < 64
    small.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(small, ids), **RELOAD_TOL)



class _NeedsMoreThanItsConfig(transformers.LlamaForCausalLM):
    """A PreTrainedModel that its config alone does not build: export must still work."""

    def __init__(self, config, extra):
        super().__init__(config)
        self.extra = extra


def test_a_model_its_config_cannot_rebuild_still_exports_and_refuses_save_pretrained(tmp_path):
    torch.manual_seed(0)
    config = _llama().config
    model, ids = _NeedsMoreThanItsConfig(config, extra=1).eval(), torch.randint(0, VOCAB, (2, 8))
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=dict(input_ids=ids)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(0.5)
    small = mutator.export(model)
    torch.testing.assert_close(_logits(small, ids), _logits(model, ids), rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match=r"_NeedsMoreThanItsConfig cannot be rebuilt from a LlamaConfig.*save_pruned"):
        small.save_pretrained(tmp_path)


# ------------------------------------------------------------------ every family of the sweep: tie, export, reload
from pyprune.app.bench.transformers_zoo import FAMILIES, build_family, main_output  # noqa: E402
from pyprune.tracing import trace_channel_units  # noqa: E402
from pyprune.tracing.example_inputs import call_model  # noqa: E402


def _prepared_family(name, make=None):
    """(model, prepared mutator, CallArgs) of a zoo family (hidden 64, 4 heads, 2 layers, vocabulary 128), or of
    ``make()`` -> (model, CallArgs)."""
    torch.manual_seed(0)
    model, inputs = build_family(name) if make is None else make()
    model.eval()
    trace = lambda *args, **kwargs: trace_channel_units(*args, gqa=FAMILIES[name].gqa, **kwargs)  # noqa: E731
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=inputs.kwargs), trace_fn=trace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mutator.prepare_from_supernet(model)
    return model, mutator, inputs


def _output(model, inputs):
    with torch.no_grad():
        return main_output(call_model(model, inputs))


def _gemma_like(config_class, model_class, tied):
    def make():
        from pyprune.app.bench.transformers_zoo import _DECODER, _text
        config = getattr(transformers, config_class)(num_key_value_heads=2, head_dim=16,
                                                     **dict(_DECODER, tie_word_embeddings=tied))
        return _text(getattr(transformers, model_class)(config))
    return make


FAMILY_CASES = {  # case: (zoo family, builder or None for the zoo's, {config field: value after ratio 0.5 + tie})
    # Gemma's sqrt(hidden_size) embedding scale folded into the table (and, tied, into the final norm)
    "gemma tied": ("gemma", None, {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}),
    "gemma untied": ("gemma", _gemma_like("GemmaConfig", "GemmaForCausalLM", False), {"hidden_size": 32}),
    "gemma2 tied": ("gemma", _gemma_like("Gemma2Config", "Gemma2ForCausalLM", True), {"hidden_size": 32}),
    "gemma3 tied": ("gemma", _gemma_like("Gemma3TextConfig", "Gemma3ForCausalLM", True), {"hidden_size": 32}),
    # one num_heads for the encoder's, the decoder's and the cross-attention's heads; the cross-attention's do not
    # prune (its zero position bias is sized by the head count), so the tie keeps all of them; model_dim folded
    "t5": ("t5", None, {"d_model": 32, "d_ff": 64, "num_heads": 4, "d_kv": 16}),
    # a field per role: encoder / decoder heads and MLP widths, one d_model for both stacks and the convolutions
    "whisper": ("whisper", None, {"d_model": 32, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                                  "encoder_attention_heads": 2, "decoder_attention_heads": 2}),
    # sub-configs, each tower with its own widths (head width = hidden / heads in both)
    "clip": ("clip", None, {"text_config.hidden_size": 32, "text_config.num_attention_heads": 2,
                            "text_config.intermediate_size": 64, "vision_config.hidden_size": 32,
                            "vision_config.num_attention_heads": 2, "vision_config.intermediate_size": 64}),
}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_a_tied_uniform_export_of_every_family_reloads_to_the_same_logits(case, tmp_path):
    name, make, expected = FAMILY_CASES[case]
    model, mutator, inputs = _prepared_family(name, make)
    mutator.set_global_ratio(0.5)
    hf_export.tie_uniform_widths(mutator, model=model)
    assert hf_export.is_uniform(mutator)
    dynamic = _output(model, inputs)
    weights_before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    small = mutator.export(model).eval()
    assert not hasattr(small, hf_export.HF_SAVE_REFUSED), getattr(small, hf_export.HF_SAVE_REFUSED, "")
    for path, value in expected.items():
        assert hf_fields.get_field(small.config, path) == value, path
    exported = _output(small, inputs)
    scale = float(dynamic.abs().max())
    torch.testing.assert_close(exported, dynamic, rtol=0, atol=1e-4 * scale)
    for key, value in model.state_dict().items():  # the folds changed the export only, not the dynamic model
        if key in weights_before:
            assert torch.equal(value, weights_before[key]), key
    small.save_pretrained(tmp_path)
    reloaded = getattr(transformers, FAMILIES[name].auto).from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(small)
    torch.testing.assert_close(_output(reloaded, inputs), exported, rtol=0, atol=1e-5 * scale)


def test_gemma_export_takes_the_new_embedding_scale_and_its_tied_table_stays_tied():
    model, mutator, _ = _prepared_family("gemma")
    mutator.set_global_ratio(0.5)
    small = mutator.export(model)
    embed = small.model.embed_tokens
    assert embed.scalar_embed_scale == pytest.approx(32 ** 0.5) and float(embed.embed_scale) == pytest.approx(32 ** 0.5)
    assert model.model.embed_tokens.scalar_embed_scale == 8.0  # the dynamic model keeps its own
    assert small.lm_head.weight is embed.weight


def test_one_config_field_ties_units_across_roles():
    # T5: one num_heads for the encoder's and decoder's self-attention and the cross-attention (which keeps its 4)
    model, mutator, _ = _prepared_family("t5")
    heads = [u for u in mutator.mutable_units if u.name.endswith("SelfAttention.q_(0, 64)_4")]
    assert {u.name.split(".")[0] for u in heads} == {"encoder", "decoder"}
    mutator.set_global_ratio(0.5)
    assert {u.active_channels for u in heads} == {2}
    assert hf_export.is_uniform(mutator) and not hf_export.is_uniform(mutator, model)  # per role, not per field
    group = ("encoder.block.*.layer.*.SelfAttention.q_(0, 64)_4 + decoder.block.*.layer.*.EncDecAttention.q_(0, 64)_4"
             " + decoder.block.*.layer.*.SelfAttention.q_(0, 64)_4")
    # one self-attention unit per stack (the relative position bias is shared by its layers), a fixed cross one per
    # decoder layer
    assert hf_export.non_uniform_roles(mutator, model) == {group: [2, 4, 2, 4]}
    counts = hf_export.tie_uniform_widths(mutator, model=model)
    assert {u.active_channels for u in heads} == {4} and hf_export.is_uniform(mutator, model)
    assert counts["encoder.block.*.layer.*.DenseReluDense.wi_(0, 128)_128"] == 64  # MLP and hidden still prune
    # Whisper: encoder and decoder MLP are two fields (each role its own count), d_model is one
    model, mutator, _ = _prepared_family("whisper")
    hf_export.set_uniform_choices(mutator, {"model.encoder.layers.*.fc1_(0, 128)_128": 96,
                                            "model.encoder.conv2_(0, 64)_64": 48}, model=model)
    by_name = {u.name: u.active_channels for u in mutator.mutable_units}
    assert by_name["model.encoder.layers.1.fc1_(0, 128)_128"] == 96
    assert by_name["model.decoder.layers.0.fc1_(0, 128)_128"] == 128  # another field: untouched
    assert by_name["model.decoder.embed_tokens_(0, 64)_64"] == by_name["model.encoder.conv1_(0, 64)_64"] == 48
    # and the heads follow the hidden size (head width = d_model / heads = 16): 48 / 16
    assert by_name["model.decoder.layers.1.encoder_attn.q_proj_(0, 64)_4"] == 3


def test_choices_one_config_field_cannot_hold_are_one_config_error_and_change_nothing():
    model, mutator, _ = _prepared_family("t5")
    before = dict(mutator.current_choices)
    # the encoder's heads at 2 while the cross-attention's stay 4: no num_heads holds both
    with pytest.raises(ConfigError, match=r"one config field governs these units.*EncDecAttention\.q_\(0, 64\)_4 "
                                          r"keeps 4.*SelfAttention\.q_\(0, 64\)_4 keeps 2"):
        hf_export.set_uniform_choices(mutator, {"encoder.block.*.layer.*.SelfAttention.q_(0, 64)_4": 2},
                                      model=model)
    assert mutator.current_choices == before
    with pytest.raises(ChannelSelectionError, match=r"DenseReluDense\.wi_\(0, 128\)_128: channel count must be in "
                                                    r"\[1, 128\], got 999"):
        hf_export.set_uniform_choices(mutator, {"encoder.block.*.layer.*.DenseReluDense.wi_(0, 128)_128": 999},
                                      model=model)
    assert mutator.current_choices == before


def test_an_untied_export_no_config_holds_is_refused_naming_the_role_and_both_shapes(tmp_path):
    model, mutator, inputs = _prepared_family("t5")
    mutator.set_global_ratio(0.5)  # self-attention heads 2, cross-attention heads 4 (not tied)
    small = mutator.export(model)
    with pytest.raises(ConfigError, match=r"T5Config \(d_model=32, d_ff=64, num_heads=2\): decoder\.block\.\*\."
                                          r"layer\.\*\.EncDecAttention\.q\.weight is \[64, 32\] in the export but "
                                          r"\[32, 32\] from the config.*save_pruned"):
        small.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


class _DerivesAFloatFromTheWidth(transformers.LlamaForCausalLM):
    """A model whose __init__ derives a float from hidden_size that no weight is known to undo."""

    def __init__(self, config):
        super().__init__(config)
        self.model.norm.width_scale = config.hidden_size ** -0.5


def test_a_derived_float_no_weight_undoes_keeps_the_export_and_refuses_its_save(tmp_path):
    torch.manual_seed(0)
    model = _DerivesAFloatFromTheWidth(_llama().config).eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=dict(input_ids=ids)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(0.5)
    small = mutator.export(model)
    assert small.model.norm.width_scale == 0.125 and small.config.hidden_size == 64  # untouched, old config kept
    with pytest.raises(ConfigError, match=r"model\.norm\.width_scale is 0\.125 in the export but 0\.176777 .*no "
                                          r"weight is known to undo it"):
        small.save_pretrained(tmp_path)


def test_a_folded_export_round_trips_through_save_pruned(tmp_path):
    # load_pruned folds the fresh export's scales as export does, then loads the folded weights the file holds
    model, mutator, inputs = _prepared_family("gemma")
    mutator.set_global_ratio(0.5)
    small = mutator.export(model).eval()
    save_pruned(tmp_path, model, mutator, exported=small)
    torch.manual_seed(1)  # another initialisation: the weights must come from the file
    fresh, _ = build_family("gemma")
    loaded = load_pruned(fresh, tmp_path / "structure.json", tmp_path / "pruned_model.pt").eval()
    assert loaded.model.embed_tokens.scalar_embed_scale == pytest.approx(32 ** 0.5)
    torch.testing.assert_close(_output(loaded, inputs), _output(small, inputs), rtol=0, atol=0)


SOLVED = {  # family: the fields of a smaller config, each read back off the model built from it
    "phi3": dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64),  # head_dim
    "t5": dict(d_model=32, num_heads=2, d_ff=64),  # derived from hidden / heads; T5's n_heads attribute
    "whisper": dict(d_model=32, encoder_attention_heads=2, decoder_attention_heads=1, encoder_ffn_dim=64,
                    decoder_ffn_dim=96),
    "llama-gqa": dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64),
}


@pytest.mark.parametrize("name", list(SOLVED))
def test_every_changed_field_is_read_back_off_the_widths_it_governs(name):
    model, _ = build_family(name)
    smaller = copy.deepcopy(model.config)
    for key, value in SOLVED[name].items():
        setattr(smaller, key, value)
    built = hf_fields.build_on_meta(type(model), smaller)
    governed = hf_fields.field_map(type(model), model.config)
    assert hf_fields.solve_fields(built, model.config, governed) == SOLVED[name]


def test_a_model_without_token_tables_exports_and_its_save_gives_the_reason(tmp_path):
    # Wav2Vec2's get_input_embeddings raises NotImplementedError: the export must not depend on it
    import transformers as t
    torch.manual_seed(0)
    config = t.Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, conv_dim=(16,), conv_stride=(5,), conv_kernel=(10,),
                              num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    model, audio = t.Wav2Vec2ForCTC(config).eval(), torch.randn(2, 800)
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=dict(input_values=audio)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(0.5)
    small = mutator.export(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(input_values=audio).logits, model(input_values=audio).logits,
                                   rtol=0, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="Wav2Vec2ForCTC"):
        small.save_pretrained(tmp_path)
