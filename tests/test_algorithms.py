"""BaseAlgorithm / ItePruneAlgorithm: schedule values, hooks, target validation, checkpoints and resume, save/load.

On :class:`SmallNet` (tests/models.py: residual add, concat, depthwise and grouped convs, flatten -> linear)
through the real tracer and DynamicOps.
"""
import io
import json
import re

import pytest
import torch
import torch.nn.functional as F

from models import SmallNet
from pyprune.algorithms import BaseAlgorithm, ItePruneAlgorithm, load_pruned, save_pruned
from pyprune.algorithms.unit_state import restore_selection
from pyprune.errors import ChannelSelectionError, ConfigError
from pyprune.mutators import ChannelMutator

RESIDUAL = "conv0_(0, 8)_8"    # conv0 / bn0 / conv1 / bn1 (residual add): 8 channels, groups 1
GCONV = "gconv_(0, 8)_8"       # 8 channels, groups 2 (counts are even)


def make(unit_type="SequentialMutableChannelUnit", choice_mode="ratio", seed=0, **algorithm_args):
    torch.manual_seed(seed)
    model = SmallNet()
    mutator = ChannelMutator(channel_unit_cfg=dict(type=unit_type, default_args=dict(choice_mode=choice_mode)),
                             parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    args = dict(target_pruning_ratio=0.5, step_freq=3, prune_times=4)
    args.update(algorithm_args)
    return model, mutator, ItePruneAlgorithm(model, mutator, **args)


def counts(mutator):
    return {u.name: u.active_channels for u in mutator.mutable_units}


def indices(mutator):
    return {u.name: u.current_index.tolist() for u in mutator.mutable_units}


# --------------------------------------------------------------------------------------------------- schedule
def test_linear_schedule_by_iteration_prunes_at_mmrazor_counters():
    model, mutator, algorithm = make(step_freq=3, prune_times=4)
    assert mutator.units, "the algorithm prepares an unprepared mutator"
    history = []
    for iteration in range(15):
        if algorithm.step():
            history.append((iteration, counts(mutator)[RESIDUAL], counts(mutator)[GCONV], algorithm.done))
    # prune when counter % 3 == 0 and counter // 3 < 4; step t keeps 1 - 0.5 * t / 4 of the channels
    assert history == [(0, 7, 8, False), (3, 6, 6, False), (6, 5, 6, False), (9, 4, 4, True)]
    assert algorithm.counter == 15 and algorithm.steps_done == 4
    assert algorithm.choices_at(1)[RESIDUAL] == pytest.approx(0.875)
    assert algorithm.choices_at(3)[RESIDUAL] == pytest.approx(0.625)
    assert mutator.current_choices[RESIDUAL] == pytest.approx(0.5)


def test_constant_schedule_sets_the_target_at_every_step():
    _, mutator, algorithm = make(linear_schedule=False, step_freq=2, prune_times=3)
    assert all(algorithm.choices_at(t) == algorithm.target for t in (1, 2, 3))
    pruned_at = [i for i in range(8) if algorithm.step()]
    assert pruned_at == [0, 2, 4] and algorithm.done
    assert counts(mutator)[RESIDUAL] == 4


def test_by_epoch_counts_epochs_only():
    _, mutator, algorithm = make(by_epoch=True, step_freq=2, prune_times=2)
    for _ in range(5):
        assert not algorithm.step()
    assert counts(mutator)[RESIDUAL] == 8 and algorithm.counter == 0
    pruned_at = [epoch for epoch in range(5) if algorithm.epoch_end()]
    assert pruned_at == [0, 2] and algorithm.done
    assert counts(mutator)[RESIDUAL] == 4


def test_number_mode_and_per_unit_counts():
    _, mutator, algorithm = make(choice_mode="number", target_pruning_ratio={RESIDUAL: 2, GCONV: 0.5}, step_freq=1,
                                 prune_times=3)
    seen = []
    for _ in range(3):
        algorithm.step()
        seen.append((mutator.current_choices[RESIDUAL], mutator.current_choices[GCONV]))
    assert [c for c, _ in seen] == [6, 4, 2]            # 8 -> 2 channels in thirds, as ints
    assert [algorithm.choices_at(t)[GCONV] for t in (1, 2, 3)] == [6, 5, 4]   # 8 -> 4: 6.67, 5.33, 4 truncated
    assert [g for _, g in seen] == [6, 6, 4]            # groups=2: the unit keeps an even count
    assert counts(mutator)[GCONV] == 4 and all(isinstance(c, int) for c, _ in seen)
    others = [u for u in mutator.mutable_units if u.name not in (RESIDUAL, GCONV)]
    assert others and all(u.active_channels == u.num_channels for u in others)


@pytest.mark.parametrize("target, error, message", [
    (0.0, ChannelSelectionError, r"\(0, 1\]"),
    (1.5, ChannelSelectionError, r"\(0, 1\]"),
    (float("nan"), ChannelSelectionError, "nan"),
    (True, ChannelSelectionError, "True"),
    ({"no_such_unit": 0.5}, ConfigError, "no_such_unit"),
    ({"fc_(0, 5)_5": 0.5}, ConfigError, "model output"),
    ({RESIDUAL: 0.0}, ChannelSelectionError, "conv0"),
    ({RESIDUAL: 9}, ChannelSelectionError, r"conv0.*\[1, 8\]"),
    ({RESIDUAL: float("inf")}, ChannelSelectionError, "conv0"),
])
def test_bad_targets_raise_and_leave_the_model_at_full_width(target, error, message):
    torch.manual_seed(0)
    model = SmallNet()
    mutator = ChannelMutator(channel_unit_cfg="L1MutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    with pytest.raises(error, match=message):
        ItePruneAlgorithm(model, mutator, target, step_freq=1, prune_times=2, strict=True)
    assert mutator.mutable_units and all(u.active_channels == u.num_channels for u in mutator.mutable_units)


@pytest.mark.parametrize("kwargs", [dict(step_freq=0), dict(prune_times=-1), dict(step_freq=1.5)])
def test_bad_schedule_arguments(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        make(**kwargs)


# -------------------------------------------------------------------------------------------- importance units
def test_l1_units_rerank_at_every_step():
    model, mutator, algorithm = make("L1MutableChannelUnit", linear_schedule=False, step_freq=1, prune_times=2)
    unit = next(u for u in mutator.mutable_units if u.name == RESIDUAL)
    algorithm.step()
    kept = unit.current_index.tolist()
    assert len(kept) == 4
    dropped = sorted(set(range(8)) - set(kept))[0]
    with torch.no_grad():  # training made a dropped channel the most important one
        model.conv0.weight[dropped] *= 100
        model.conv1.weight[dropped] *= 100
    algorithm.step()
    assert dropped in unit.current_index.tolist()


def _train(model, algorithm, optimizer, iterations, seed):
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(iterations):
        images = torch.randn(4, 3, 8, 8, generator=generator)
        labels = torch.randint(0, 5, (4,), generator=generator)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        algorithm.after_backward()
        optimizer.step()
        algorithm.step()


def test_taylor_accumulates_and_restarts_after_each_step():
    model, mutator, algorithm = make("TaylorMutableChannelUnit", step_freq=3, prune_times=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    unit = mutator.mutable_units[0]
    _train(model, algorithm, optimizer, 1, seed=1)   # iteration 0: one backward, then the first step
    assert unit.channel_importance() is None         # reset after the step
    _train(model, algorithm, optimizer, 2, seed=2)
    assert unit.num_updates == 2 and unit.channel_importance().shape == (8,)


# ------------------------------------------------------------------------------------------ checkpoint / resume
def _checkpoint(model, optimizer, algorithm):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "algorithm": algorithm.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("unit_type", ["L1MutableChannelUnit", "TaylorMutableChannelUnit"])
def test_resumed_run_ends_like_an_uninterrupted_one(unit_type):
    def fresh():
        model, mutator, algorithm = make(unit_type, step_freq=3, prune_times=3, seed=7)
        return model, mutator, algorithm, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, mutator, algorithm, optimizer = fresh()
    _train(model, algorithm, optimizer, 4, seed=11)
    _train(model, algorithm, optimizer, 8, seed=12)
    reference = (indices(mutator), {k: v.clone() for k, v in mutator.export(model).state_dict().items()})

    model, mutator, algorithm, optimizer = fresh()
    _train(model, algorithm, optimizer, 4, seed=11)   # stopped mid-pruning: step 2 of 3 has been taken
    assert algorithm.steps_done == 2 and not algorithm.done
    saved = _checkpoint(model, optimizer, algorithm)

    model, mutator, algorithm, optimizer = fresh()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    algorithm.load_state_dict(saved["algorithm"])
    assert algorithm.counter == 4 and algorithm.steps_done == 2
    _train(model, algorithm, optimizer, 8, seed=12)
    assert algorithm.done
    assert indices(mutator) == reference[0]
    exported = mutator.export(model).state_dict()
    assert exported.keys() == reference[1].keys()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, reference[1][name], rtol=0, atol=0, msg=name)


def test_state_dict_restores_the_supernet_on_an_already_pruned_model():
    _, mutator, algorithm = make(step_freq=1, prune_times=4)
    algorithm.step()
    algorithm.step()
    state = algorithm.state_dict()
    model = SmallNet()
    mutator = ChannelMutator(dict(type="SequentialMutableChannelUnit", default_args=dict(choice_mode="ratio")),
                             parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(0.75)        # built on a model that is already at step 2's width
    resumed = ItePruneAlgorithm(model, mutator, 0.5, step_freq=1, prune_times=4)
    resumed.load_state_dict(state)
    assert resumed.supernet[RESIDUAL] == 1.0 and resumed.choices_at(3)[RESIDUAL] == pytest.approx(0.625)
    resumed.step()
    assert counts(mutator)[RESIDUAL] == 5


def test_load_state_dict_rejects_other_schedules_and_units():
    _, _, algorithm = make(step_freq=3, prune_times=4)
    state = algorithm.state_dict()
    _, _, other = make(step_freq=2, prune_times=4)
    with pytest.raises(ConfigError, match="step_freq"):
        other.load_state_dict(state)
    _, _, other = make(step_freq=3, prune_times=4, target_pruning_ratio=0.25)
    with pytest.raises(ConfigError, match="target"):
        other.load_state_dict(state)
    del state["selections"][RESIDUAL]
    with pytest.raises(ConfigError, match="missing"):
        algorithm.load_state_dict(state)


def test_the_checkpoint_saves_selections_in_the_model_state_dicts_per_unit_form():
    model, mutator, algorithm = make("L1MutableChannelUnit", step_freq=1, prune_times=2)
    algorithm.step()
    assert algorithm.state_dict()["selections"].keys() == model.state_dict()["_pyprune_selection"].keys()
    for name, index in algorithm.state_dict()["selections"].items():
        assert _same_index(index, model.state_dict()["_pyprune_selection"][name]), name


def _same_index(a, b):
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def test_an_old_count_and_index_checkpoint_still_loads_with_a_deprecation_warning():
    _, mutator, algorithm = make("L1MutableChannelUnit", step_freq=1, prune_times=2)
    algorithm.step()
    state = algorithm.state_dict()
    state["selections"] = {u.name: {"count": u.active_channels, "index": u.current_index.clone()}
                           for u in mutator.mutable_units}  # the form older releases wrote (mutable units only)
    _, resumed_mutator, resumed = make("L1MutableChannelUnit", step_freq=1, prune_times=2)
    with pytest.warns(DeprecationWarning, match="'count', 'index'"):
        resumed.load_state_dict(state)
    assert indices(resumed_mutator) == indices(mutator) and resumed.steps_done == 1


def test_a_bad_checkpoint_selection_names_the_unit_and_changes_nothing():
    _, mutator, algorithm = make(step_freq=1, prune_times=2)
    state = algorithm.state_dict()
    state["selections"][GCONV] = torch.tensor([0, 1, 2])  # 3 of 8 channels: not balanced over the 2 groups
    algorithm.step()
    before = indices(mutator)
    with pytest.raises(ConfigError, match=rf"unit {re.escape(GCONV)}: .*same number of channels"):
        algorithm.load_state_dict(state)
    assert indices(mutator) == before and algorithm.steps_done == 1


def test_restore_selection_reproduces_an_arbitrary_index():
    _, mutator, _ = make("L1MutableChannelUnit")
    unit = mutator.mutable_units[0]
    restore_selection(unit, torch.tensor([1, 4, 6]))
    assert unit.current_index.tolist() == [1, 4, 6] and unit.active_channels == 3


def test_base_algorithm_hooks_do_not_prune():
    model, mutator = SmallNet(), ChannelMutator(parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    algorithm = BaseAlgorithm(model, mutator)
    assert not algorithm.step() and not algorithm.epoch_end()
    assert all(u.active_channels == u.num_channels for u in mutator.mutable_units)


# ------------------------------------------------------------------------------------------------- save / load
def test_save_and_load_pruned_into_a_fresh_model(tmp_path):
    model, mutator, algorithm = make("L1MutableChannelUnit", step_freq=1, prune_times=2, target_pruning_ratio=0.5)
    while not algorithm.done:
        algorithm.step()
    paths = save_pruned(tmp_path, model, mutator, {"name": "SmallNet", "num_classes": 5})
    structure = json.loads(open(paths["structure"]).read())
    assert structure["model"] == {"name": "SmallNet", "num_classes": 5}
    assert structure["mutator"]["channel_unit_cfg"]["units"][RESIDUAL]["choice"] == pytest.approx(0.5)
    assert "channels" in structure["mutator"]["channel_unit_cfg"]["units"][RESIDUAL]

    reloaded = load_pruned(SmallNet(), paths["structure"], paths["weights"]).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert reloaded.conv0.weight.shape[0] == 4
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in SmallNet().parameters())


def test_save_pruned_creates_a_missing_directory_and_refuses_a_file(tmp_path):
    model, mutator, algorithm = make(step_freq=1, prune_times=1, target_pruning_ratio=0.5)
    algorithm.step()
    paths = save_pruned(tmp_path / "runs" / "first", model, mutator)
    assert load_pruned(SmallNet(), paths["structure"], paths["weights"]).conv0.weight.shape[0] == 4
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        save_pruned(not_a_directory, model, mutator)
    assert not_a_directory.read_text() == "x"


def test_load_pruned_with_mismatching_weights_is_a_config_error(tmp_path):
    model, mutator, algorithm = make(step_freq=1, prune_times=1, target_pruning_ratio=0.5)
    algorithm.step()
    paths = save_pruned(tmp_path, model, mutator)
    full = {k: v for k, v in SmallNet().state_dict().items()}
    with pytest.raises(ConfigError, match="do not fit"):
        load_pruned(SmallNet(), paths["structure"], full)
