"""Mutator state never disagrees with the model (issue 13, items 6-9): nothing exports unprepared, loaded selections
reach the units, a structure must cover the model it is applied to, and ratio-mode units refuse int choices."""
import re

import pytest
import torch
import torchvision

from pyprune.errors import ChannelSelectionError, ConfigError
from pyprune.mutators import ChannelMutator, load_pruned, save_pruned

SIZE = 32


def prepared(arch="resnet18", ratio=None):
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    mutator = ChannelMutator(dict(type="L1MutableChannelUnit", default_args=dict(choice_mode="ratio")),
                             parse_cfg=dict(demo_input=(1, 3, SIZE, SIZE)))
    mutator.prepare_from_supernet(model)
    if ratio is not None:
        mutator.set_global_ratio(ratio)
    return model.eval(), mutator


def tensors(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_export_and_summary_before_prepare_raise():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with pytest.raises(ConfigError, match="not prepared"):
        ChannelMutator().export(model)
    with pytest.raises(ConfigError, match="not prepared"):
        ChannelMutator().summary(model, (1, 3, SIZE, SIZE))


def test_loaded_selections_reach_the_units_and_save_pruned(tmp_path):
    pruned, pruned_mutator = prepared(ratio=0.5)
    fresh, mutator = prepared()
    assert set(mutator.current_choices.values()) == {1.0}
    fresh.load_state_dict(pruned.state_dict())
    assert mutator.current_choices == pruned_mutator.current_choices
    for unit, theirs in zip(mutator.mutable_units, pruned_mutator.mutable_units):
        assert torch.equal(unit.current_index, theirs.current_index)
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(fresh(x), pruned(x), rtol=0, atol=0)
    save_pruned(tmp_path, fresh, mutator, {"name": "resnet18", "num_classes": 10})
    reloaded = load_pruned(torchvision.models.resnet18(weights=None, num_classes=10), tmp_path / "structure.json",
                           tmp_path / "pruned_model.pt").eval()
    torch.testing.assert_close(reloaded(x), pruned(x), rtol=1e-5, atol=1e-5)


def test_a_plain_state_dict_keeps_the_current_selection():
    model, mutator = prepared(ratio=0.5)
    choices = mutator.current_choices
    plain = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    model.load_state_dict(plain, strict=False)
    assert mutator.current_choices == choices


def test_disagreeing_selections_are_refused_before_anything_loads():
    source, _ = prepared(ratio=0.5)
    state = source.state_dict()
    state["layer1.0.bn1._extra_state"] = {"out_index": torch.arange(5), "in_index": None}
    model, mutator = prepared()
    before, choices = tensors(model), mutator.current_choices
    with pytest.raises(ConfigError, match=r"unit layer1\.0\.conv1.*disagree.*layer1\.0\.bn1"):
        model.load_state_dict(state)
    after = tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and mutator.current_choices == choices


def test_a_fixed_unit_may_not_lose_channels_through_a_state_dict():
    source, _ = prepared(ratio=0.5)
    state = source.state_dict()
    model, mutator = prepared()
    fixed_fc = "fc._extra_state"  # the logits are a fixed unit's channels
    state[fixed_fc] = {"out_index": torch.arange(5), "in_index": state[fixed_fc]["in_index"]}
    with pytest.raises(ConfigError, match="not prunable"):
        model.load_state_dict(state)


@pytest.mark.parametrize("other", ["resnet34", "resnet50"])
def test_a_structure_from_another_model_is_refused(tmp_path, other):
    model, mutator = prepared(ratio=0.5)
    save_pruned(tmp_path, model, mutator, {"name": "resnet18", "num_classes": 10})
    target = getattr(torchvision.models, other)(weights=None, num_classes=10)
    before = tensors(target)
    with pytest.raises(ConfigError, match=r"does not cover the model: \d+ prunable layers .*layer1\.[0-2]\."):
        load_pruned(target, tmp_path / "structure.json", None)
    assert all(torch.equal(before[k], v) for k, v in tensors(target).items())
    assert not any(type(m).__module__.startswith("pyprune") for m in target.modules())


@pytest.mark.parametrize("choice", [1, 32])
def test_an_int_choice_in_ratio_mode_says_how_to_use_counts(choice):
    model, mutator = prepared()
    name = mutator.mutable_units[0].name
    with pytest.raises(ChannelSelectionError, match=f"unit {re.escape(name)}.*choice_mode=.number."):
        mutator.set_choices({name: choice})
    assert mutator.current_choices[name] == 1.0


def test_number_mode_takes_counts():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    mutator = ChannelMutator(dict(type="SequentialMutableChannelUnit", default_args=dict(choice_mode="number")),
                             parse_cfg=dict(demo_input=(1, 3, SIZE, SIZE)))
    mutator.prepare_from_supernet(model)
    unit = mutator.mutable_units[0]
    mutator.set_choices({unit.name: 32})
    assert unit.active_channels == 32


def test_count_flops_sees_multihead_attention_and_restores_the_fast_path():
    """The eval fast path of nn.MultiheadAttention is one fused op FlopCounterMode does not count."""
    from torch import nn

    from pyprune.mutators import count_flops

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attention(x, x, x, need_weights=False)[0]

    batch, tokens, width = 2, 5, 16
    projections = 2 * batch * tokens * (3 * width * width + width * width)  # q/k/v in, out: 2 per multiply-add
    assert count_flops(Attend(), (torch.randn(batch, tokens, width),)) >= projections
    assert torch.backends.mha.get_fastpath_enabled()


def test_a_prepared_model_pickles_and_its_copy_does_not_drive_the_mutator(tmp_path):
    """The load hooks are picklable objects holding the mutator weakly; a copy (export deep-copies) or an unpickled
    model carries inert hooks, while the original keeps following its loads."""
    import copy
    import io

    model, mutator = prepared(ratio=0.5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 3, SIZE, SIZE)
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    duplicate = copy.deepcopy(model)
    fresh, _ = prepared()
    duplicate.load_state_dict(fresh.state_dict())  # full width into the copy: the mutator is not told
    assert set(mutator.current_choices.values()) == {0.5}
    model.load_state_dict(fresh.state_dict())      # into the mutator's own model: it follows
    assert set(mutator.current_choices.values()) == {1.0}
