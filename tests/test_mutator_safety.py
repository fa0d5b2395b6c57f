"""Mutator state never disagrees with the model: nothing exports unprepared, a state_dict saves the selection once per
unit and loading one gives it to the units (bad ones refused, nothing changed), a structure must cover the model it
is applied to, and ratio-mode units refuse int choices."""
import io
import re

import pytest
import torch
import torchvision

from pyprune import ops
from pyprune.errors import ChannelSelectionError, ConfigError
from pyprune.mutators import ChannelMutator, load_pruned, save_pruned

SIZE = 32
SELECTION = "_pyprune_selection"  # the one state_dict entry that holds a prepared model's selection


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
    buffer = io.BytesIO()
    torch.save(pruned.state_dict(), buffer)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
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
    plain = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    model.load_state_dict(plain)  # strict: a prepared model has the plain model's keys plus one selection entry
    assert mutator.current_choices == choices
    assert set(model.state_dict()) == set(plain) | {SELECTION}


def test_the_state_dict_saves_the_selection_once_per_unit_and_export_none():
    model, mutator = prepared(ratio=0.5)
    saved = model.state_dict()[SELECTION]
    assert list(saved) == [u.name for u in mutator.units] and not any(k.endswith("_extra_state") for k in
                                                                       model.state_dict())
    for unit in mutator.units:
        if unit.is_mutable:
            assert saved[unit.name].dtype == torch.int64 and torch.equal(saved[unit.name], unit.current_index)
        else:
            assert saved[unit.name] is None
    assert SELECTION not in mutator.export(model).state_dict()


def _break(state, unit_name, value):
    state[SELECTION] = {**state[SELECTION], unit_name: value}
    return state


BAD_SELECTIONS = {  # what replaces the first residual unit's entry -> what the error says
    "out of range": (lambda n: torch.arange(n // 2) + n, r"channel index \d+ is out of range"),
    "repeated": (lambda n: torch.zeros(2, dtype=torch.int64), "given more than once"),
    "float": (lambda n: torch.arange(4.0), "int64"),
    "2-D": (lambda n: torch.arange(4).reshape(2, 2), "1-D"),
    "a list": (lambda n: [0, 1], "is a list, expected an int64 index tensor"),
}


@pytest.mark.parametrize("bad", BAD_SELECTIONS)
def test_a_bad_saved_selection_is_refused_before_anything_loads(bad):
    source, _ = prepared(ratio=0.5)
    model, mutator = prepared()
    unit = mutator.mutable_units[1]
    make, message = BAD_SELECTIONS[bad]
    state = _break(source.state_dict(), unit.name, make(unit.num_channels))
    before, choices = tensors(model), mutator.current_choices
    with pytest.raises(ConfigError, match=rf"unit {re.escape(unit.name)}: .*{message}"):
        model.load_state_dict(state)
    after = tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and mutator.current_choices == choices


def test_a_selection_saved_for_other_units_is_refused():
    source, _ = prepared(ratio=0.5)
    model, mutator = prepared()
    state = source.state_dict()
    saved = dict(state[SELECTION])
    gone = mutator.units[2].name
    saved["ghost_(0, 4)_4"] = saved.pop(gone)
    state[SELECTION] = saved
    with pytest.raises(ConfigError, match=rf"missing: \[{re.escape(repr(gone))}\], unknown: \['ghost_\(0, 4\)_4'\]"):
        model.load_state_dict(state)
    assert set(mutator.current_choices.values()) == {1.0}
    with pytest.raises(ConfigError, match="a saved channel selection is a dict"):
        model.load_state_dict({**state, SELECTION: [1, 2]})


def test_a_fixed_unit_may_not_lose_channels_through_a_state_dict():
    source, _ = prepared(ratio=0.5)
    model, mutator = prepared()
    logits = next(u for u in mutator.units if not u.is_mutable and u.name.startswith("fc"))
    state = _break(source.state_dict(), logits.name, torch.arange(5))
    with pytest.raises(ConfigError, match=rf"unit {re.escape(logits.name)}: the unit is not prunable"):
        model.load_state_dict(state)


def legacy_state(model):
    """``model``'s state_dict in the per-layer form older releases wrote (each DynamicOp's extra state)."""
    state = model.state_dict()
    del state[SELECTION]
    for name, layer in model.named_modules():
        if isinstance(layer, ops.DynamicChannelMixin):
            state[f"{name}._extra_state"] = {"out_index": layer.out_index, "in_index": layer.in_index}
    return state


def test_an_old_per_layer_state_dict_still_loads_with_a_deprecation_warning():
    pruned, pruned_mutator = prepared(ratio=0.5)
    fresh, mutator = prepared()
    with pytest.warns(DeprecationWarning, match="per-layer channel selections") as caught:
        fresh.load_state_dict(legacy_state(pruned))
    assert caught[0].filename == __file__  # points at the caller's load_state_dict line
    assert mutator.current_choices == pruned_mutator.current_choices
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(fresh(x), pruned(x), rtol=0, atol=0)


def test_old_per_layer_selections_that_disagree_are_refused_before_anything_loads():
    source, _ = prepared(ratio=0.5)
    state = legacy_state(source)
    state["layer1.0.bn1._extra_state"] = {"out_index": torch.arange(5), "in_index": None}
    model, mutator = prepared()
    before, choices = tensors(model), mutator.current_choices
    with pytest.warns(DeprecationWarning), \
            pytest.raises(ConfigError, match=r"unit layer1\.0\.conv1.*disagree.*layer1\.0\.bn1"):
        model.load_state_dict(state)
    after = tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and mutator.current_choices == choices


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


def test_a_prepared_model_pickles_and_its_copy_does_not_drive_the_mutator():
    """The model carries its units (not the mutator): it saves and loads its selection when the mutator is gone, and
    a deep copy or an unpickled model has its own copy of the units, so its loads move its layers only."""
    import copy
    import gc
    import weakref

    model, mutator = prepared(ratio=0.5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 3, SIZE, SIZE)
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    fresh, _ = prepared()
    full = fresh.state_dict()
    for duplicate in (copy.deepcopy(model), restored):
        again, _ = prepared()
        again.load_state_dict(duplicate.state_dict())  # the copy saves the selection it runs with
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
        duplicate.load_state_dict(full)                # full width into the copy: its layers follow ...
        torch.testing.assert_close(duplicate(x), fresh(x), rtol=0, atol=0)
        assert set(mutator.current_choices.values()) == {0.5}  # ... the mutator's units do not
    model.load_state_dict(full)                        # into the mutator's own model: it follows
    assert set(mutator.current_choices.values()) == {1.0}
    pruned, pruned_mutator = prepared(ratio=0.5)
    alive = weakref.ref(pruned_mutator)
    del pruned_mutator
    gc.collect()
    assert alive() is None                             # the model does not keep its mutator alive ...
    fresh.load_state_dict(pruned.state_dict())        # ... and still saves its selection without it
    torch.testing.assert_close(fresh(x), pruned(x), rtol=0, atol=0)
