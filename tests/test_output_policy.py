"""``fixed_outputs``: which model outputs keep their channel count when pruning.

A plain model's outputs are all fixed by default and one is freed when only the others are named; a transformers
``ModelOutput`` frees its auxiliary fields by default (T5's ``encoder_last_hidden_state``), so the encoder's hidden
size prunes; a name that is no output field is one ConfigError listing the fields, the model untouched.
Tolerance: export == dynamic on the fixed outputs within 1e-4 of the output scale (same arithmetic, other layout).
"""
import warnings

import pytest
import torch
from torch import nn

from pyprune import ops
from pyprune.errors import ConfigError
from pyprune.mutators import ChannelMutator, count_params
from pyprune.tracing import trace_channel_units
from pyprune.tracing.example_inputs import tensor_leaves
from pyprune.tracing.outputs import fixed_output_values


class LogitsAndHidden(nn.Module):
    """``x [B, 8] -> (logits [B, 4], hidden [B, 16])``: the hidden activations are returned too."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        hidden = torch.relu(self.fc1(x))
        return self.fc2(hidden), hidden


class DictOutputs(LogitsAndHidden):
    def forward(self, x):
        logits, hidden = super().forward(x)
        return {"logits": logits, "hidden": hidden}


def _hidden_unit(specs):
    return next(s for s in specs if any(r.name == "fc1" and r.is_output_channel for r in s.output_related))


def _prepared(model, inputs, **parse):
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=inputs, **parse))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # T5's never-run `shared` embedding is warned about
        mutator.prepare_from_supernet(model)
    return mutator


def _close(exported, dynamic):
    exported, dynamic = tensor_leaves(exported), tensor_leaves(dynamic)
    assert len(exported) == len(dynamic) > 0
    for e, d in zip(exported, dynamic):
        assert e.shape == d.shape
        assert (e - d).abs().max() <= 1e-4 * d.abs().max().clamp_min(1.0)


def test_a_plain_models_outputs_are_all_fixed_by_default():
    unit = _hidden_unit(trace_channel_units(LogitsAndHidden(), torch.randn(2, 8)))
    assert unit.fixed and "model output" in unit.reason


@pytest.mark.parametrize("make, keep", [(LogitsAndHidden, [0]), (DictOutputs, ["logits"])])
def test_an_output_left_out_of_fixed_outputs_is_pruned_and_the_named_ones_keep_their_shape(make, keep):
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(2, 8)
    assert not _hidden_unit(trace_channel_units(model, x, fixed_outputs=keep)).fixed
    mutator = _prepared(model, x, fixed_outputs=keep)
    mutator.set_global_ratio(0.5)
    with torch.no_grad():
        dynamic = model(x)
        exported = mutator.export(model).eval()(x)
    hidden = exported[1] if isinstance(exported, tuple) else exported["hidden"]
    assert hidden.shape == (2, 8)  # the freed output is narrower, by design
    _close(fixed_output_values(exported, keep), fixed_output_values(dynamic, keep))


@pytest.mark.parametrize("make, bad, listed", [(LogitsAndHidden, ["logits"], "[0, 1]"),
                                               (DictOutputs, ["logits", "hiden"], "['logits', 'hidden']")])
def test_a_name_that_is_no_output_field_is_one_config_error_listing_the_fields(make, bad, listed):
    model = make()
    with pytest.raises(ConfigError, match=r"fixed_outputs: \[.*\] is no output field") as error:
        _prepared(model, torch.randn(2, 8), fixed_outputs=bad)
    assert listed in str(error.value)
    assert not any(isinstance(m, ops.DynamicChannelMixin) for m in model.modules())  # the model is untouched


def test_fixed_outputs_must_be_a_list_of_names():
    with pytest.raises(ConfigError, match="parse_cfg: fixed_outputs must be .* got a str"):
        ChannelMutator(parse_cfg=dict(demo_input=(1, 8), fixed_outputs="logits"))


def test_t5_frees_its_encoder_output_by_default_so_the_hidden_size_prunes():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                   num_heads=4, decoder_start_token_id=0)
    inputs = dict(input_ids=torch.randint(0, 64, (2, 6)), decoder_input_ids=torch.randint(0, 64, (2, 3)))
    kept = {}
    for policy in ("all", None):  # "all": every output fixed, as before the default freed auxiliary fields
        model = transformers.T5ForConditionalGeneration(config).eval()
        mutator = _prepared(model, inputs, **({} if policy is None else dict(fixed_outputs=policy)))
        hidden = [u for u in mutator.units if any(r.name == "encoder.final_layer_norm" for r in u.output_related)]
        assert len(hidden) == 1 and hidden[0].is_mutable == (policy is None)
        mutator.set_global_ratio(0.5)
        with torch.no_grad():
            dynamic = model(**inputs)
            pruned = mutator.export(model).eval()
            exported = pruned(**inputs)
        kept[policy] = count_params(pruned) / count_params(model)
        _close([exported.logits], [dynamic.logits])
        _close(fixed_output_values(exported), fixed_output_values(dynamic))
        width = exported.encoder_last_hidden_state.shape[-1]
        assert width == (16 if policy is None else 32)
    # measured on this config: 63.8 % of the parameters kept with every output fixed, 32.2 % with the default
    assert kept[None] < kept["all"] - 0.2, kept
