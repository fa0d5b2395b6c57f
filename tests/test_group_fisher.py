"""GroupFisher: the unit's Fisher information against autograd by hand, its normalisations, the global one-channel
steps of the algorithm up to a FLOPs budget, compact training, checkpoints, deploy files, configs and DDP."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.algorithms import GroupFisherAlgorithm
from pyprune.errors import ConfigError
from pyprune.mutators import ChannelMutator, GroupFisherChannelMutator, count_flops, load_pruned
from pyprune.mutators.group_fisher import sum_over_ranks
from pyprune.registry import MODELS
from pyprune.units import GroupFisherChannelUnit

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
STEM, BRANCHES = "c0_(0, 6)_6", "c1_(0, 4)_4"


class TwoConsumerNet(nn.Module):
    """``c0`` feeds two convs (``c1``, ``c2``) whose outputs are added, then a linear head. x ``[N, 3, 8, 8]``."""

    def __init__(self, width=6, branch=4):
        super().__init__()
        self.c0 = nn.Conv2d(3, width, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(width, branch, 3, padding=1), nn.Conv2d(width, branch, 1)
        self.fc = nn.Linear(branch, 3)

    def forward(self, x):
        a = F.relu(self.c0(x))
        return self.fc(F.relu(self.c1(a) + self.c2(a)).mean((2, 3)))

    def masked(self, x, stem_mask, branch_mask):
        """The forward with per-sample masks ``[N, 6]`` / ``[N, 4]`` on the units' channels where they are read."""
        a = F.relu(self.c0(x)) * stem_mask[:, :, None, None]  # one mask, at both consumers' input
        return self.fc(F.relu(self.c1(a) + self.c2(a)).mean((2, 3)) * branch_mask)


def prepared(normalization="none", mutate_linear=True, seed=0, **model_args):
    torch.manual_seed(seed)
    model = TwoConsumerNet(**model_args)
    mutator = GroupFisherChannelMutator(
        channel_unit_cfg=dict(type="GroupFisherChannelUnit",
                              default_args=dict(normalization_type=normalization, mutate_linear=mutate_linear)),
        parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    reference = copy.deepcopy(model)
    mutator.prepare_from_supernet(model)
    return model, mutator, reference


def hand_fisher(reference, x, y, kept=None):
    """Per-sample mask gradients by autograd on the plain model: ``{unit: sum over samples of g ** 2}``."""
    stem = torch.ones(x.shape[0], 6, requires_grad=True)
    branch = torch.ones(x.shape[0], 4, requires_grad=True)
    stem_mask = stem if kept is None else stem * kept
    loss = F.cross_entropy(reference.masked(x, stem_mask, branch), y)
    g_stem, g_branch = torch.autograd.grad(loss, [stem, branch])
    if kept is not None:
        g_stem = g_stem * kept  # a pruned channel has no gradient: it is not there
    return {STEM: g_stem.double().square().sum(0), BRANCHES: g_branch.double().square().sum(0)}


def close(actual, expected):
    """float32 gradients summed in another order than autograd's by hand: relative 1e-5."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0.0)


def train_step(model, algorithm, x, y):
    loss = F.cross_entropy(model(x), y)
    model.zero_grad()
    loss.backward()
    algorithm.after_backward()


def data(seed=1, batch=5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 8, 8, generator=generator), torch.randint(0, 3, (batch,), generator=generator)


# ------------------------------------------------------------------------------------------------- the unit
def test_fisher_equals_autograd_by_hand_and_accumulates_over_batches():
    model, mutator, reference = prepared()
    mutator.start_record_info()
    units = {u.name: u for u in mutator.mutable_units}
    assert sorted(units) == [STEM, BRANCHES] and units[STEM].consumer_layers() == ["c1", "c2"]
    (x1, y1), (x2, y2) = data(1), data(2)
    for x, y in ((x1, y1), (x2, y2)):
        F.cross_entropy(model(x), y).backward()
        mutator.update_importance()
    expected = {name: hand_fisher(reference, x1, y1)[name] + hand_fisher(reference, x2, y2)[name] for name in units}
    for name, unit in units.items():
        close(unit.normalized_fisher_info, expected[name])
        assert unit.num_updates == 2
    # the grad of c0's output is the sum of both consumers' shares; each share is recorded once
    assert units[STEM].normalized_fisher_info.min() > 0


def test_pruned_channels_have_no_fisher_and_the_kept_ones_match_by_hand():
    model, mutator, reference = prepared()
    stem = next(u for u in mutator.mutable_units if u.name == STEM)
    stem.apply_index(torch.tensor([0, 2, 3, 5]))
    mutator.start_record_info()
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    mutator.update_importance()
    kept = torch.tensor([1.0, 0, 1, 1, 0, 1])
    close(stem.normalized_fisher_info, hand_fisher(reference, x, y, kept)[STEM])
    importance = stem.importance()
    assert torch.isinf(importance[[1, 4]]).all() and torch.isfinite(importance[[0, 2, 3, 5]]).all()
    assert stem.try_to_prune_min_channel()
    dropped = int(importance.argmin())
    assert stem.current_index.tolist() == [c for c in (0, 2, 3, 5) if c != dropped]


def test_normalisations_divide_by_the_flops_and_the_activation_size_of_one_channel():
    x, y = data()
    raw = {}
    for normalization in ("none", "flops", "act"):
        model, mutator, reference = prepared(normalization)
        # FLOPs one channel saves (8x8 positions, 2 per multiply-add): producer out channel + consumers' in channel
        mutator.set_channel_flops({STEM: 2 * 64 * (27 + 36 + 4), BRANCHES: 2 * 64 * (54 + 6) + 2 * 3})
        mutator.start_record_info()
        F.cross_entropy(model(x), y).backward()
        mutator.update_importance()
        raw[normalization] = {u.name: u.normalized_fisher_info for u in mutator.mutable_units}
    fisher = hand_fisher(reference, x, y)
    # flops: GFLOPs per channel, from set_channel_flops
    close(raw["flops"][STEM], fisher[STEM] / (8576 / 1e9))
    close(raw["flops"][BRANCHES], fisher[BRANCHES] / (7686 / 1e9))
    # act: output positions per sample of the producing layers, in millions (c0: 64; c1 and c2: 64 each)
    close(raw["act"][STEM], fisher[STEM] / (64 / 1e6))
    close(raw["act"][BRANCHES], fisher[BRANCHES] / (128 / 1e6))
    close(raw["none"][STEM], fisher[STEM])


def test_flops_normalisation_needs_the_channel_flops():
    model, mutator, _ = prepared("flops")
    mutator.start_record_info()
    F.cross_entropy(model(data()[0]), data()[1]).backward()
    with pytest.raises(ConfigError, match=r"c0_\(0, 6\)_6: normalization_type='flops' needs the FLOPs"):
        mutator.update_importance()


def test_units_feeding_a_linear_layer_are_fixed_unless_mutate_linear():
    _, mutator, _ = prepared(mutate_linear=False)
    branches = next(u for u in mutator.units if u.name == BRANCHES)
    assert not branches.is_mutable and "feed the linear layer 'fc'" in branches.reason
    assert [u.name for u in mutator.mutable_units] == [STEM]


def test_recording_hooks_are_inert_on_a_deep_copy_and_removed_by_end_record():
    model, mutator, _ = prepared()
    mutator.start_record_info()
    x, y = data()
    F.cross_entropy(copy.deepcopy(model)(x), y).backward()
    assert all(u.batch_fisher() is None for u in mutator.mutable_units)
    mutator.end_record_info()
    F.cross_entropy(model(x), y).backward()
    assert all(u.batch_fisher() is None for u in mutator.mutable_units)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_bad_unit_and_mutator_arguments_name_the_problem():
    with pytest.raises(ConfigError, match="normalization_type must be one of"):
        prepared("memory")
    with pytest.raises(ConfigError, match="must be GroupFisherChannelUnit"):
        GroupFisherChannelMutator(channel_unit_cfg="L1MutableChannelUnit")


def test_sum_over_ranks_without_a_process_group_is_the_identity():
    tensors = [torch.ones(3, dtype=torch.float64), torch.arange(2.0, dtype=torch.float64)]
    assert all(a is b for a, b in zip(sum_over_ranks(tensors), tensors))


# -------------------------------------------------------------------------------------------- the algorithm
class Wider(nn.Module):
    """Three convs (8, 8, 8 channels) and a head: two prunable units under mmrazor's mutate_linear=False."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(F.relu(self.c0(x)))))).mean((2, 3)))


def algorithm_for(normalization="flops", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = Wider()
    mutator = dict(type="GroupFisherChannelMutator", parse_cfg=dict(demo_input=(1, 3, 8, 8)),
                   channel_unit_cfg=dict(type="GroupFisherChannelUnit",
                                         default_args=dict(normalization_type=normalization)))
    return GroupFisherAlgorithm(model, mutator, **kwargs)


def run(algorithm, iterations, seed=1, optimizer=None, until_done=False):
    generator = torch.Generator().manual_seed(seed)
    model = algorithm.model
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.05)
    pruned_at = []
    for iteration in range(iterations):
        x, y = torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        algorithm.after_backward()
        optimizer.step()
        if algorithm.step():
            pruned_at.append(iteration)
        if until_done and algorithm.done:
            break
    return pruned_at


def kept(algorithm):
    return {u.name: u.current_index.tolist() for u in algorithm.mutator.mutable_units}


def test_one_channel_per_interval_until_the_flops_budget_within_one_channel():
    algorithm = algorithm_for(interval=3, budget={"flops": 0.5})
    limit = algorithm.limits["flops"]
    pruned_at = run(algorithm, 60)
    assert algorithm.done and pruned_at == list(range(0, 3 * len(pruned_at), 3))
    widths = [sum(len(i) for i in kept(algorithm).values())]
    assert widths[0] == 16 - len(pruned_at) and algorithm.channels_pruned == len(pruned_at)
    flops = [step["flops"] for step in algorithm.history]
    assert flops[-1] <= limit < flops[-2]  # the first step that meets the budget is the last one
    exported = algorithm.export()
    assert count_flops(exported, torch.randn(1, 3, 8, 8)) == algorithm.cost().flops == flops[-1]
    x = torch.randn(2, 3, 8, 8)
    algorithm.model.eval()
    torch.testing.assert_close(exported.eval()(x), algorithm.model(x))


@pytest.mark.parametrize("normalization, cost", [
    ("none", {STEM: 1.0, BRANCHES: 1.0}), ("act", {STEM: 64.0, BRANCHES: 128.0}),
    ("flops", {STEM: 8576.0, BRANCHES: 7686.0}), ("flops", {STEM: 1e12, BRANCHES: 1.0}),
    ("flops", {STEM: 1.0, BRANCHES: 1e12})])
def test_the_pruned_channel_is_the_smallest_fisher_per_cost_over_all_units(normalization, cost):
    model, mutator, reference = prepared(normalization)
    mutator.set_channel_flops(cost if normalization == "flops" else {STEM: 1.0, BRANCHES: 1.0})
    mutator.start_record_info()
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    mutator.update_importance()
    per_cost = {name: fisher / cost[name] for name, fisher in hand_fisher(reference, x, y).items()}
    unit_name = min(per_cost, key=lambda name: float(per_cost[name].min()))
    channel = int(per_cost[unit_name].argmin())
    unit = mutator.try_prune()
    assert unit.name == unit_name and channel not in unit.current_index.tolist()
    assert unit.active_channels == unit.num_channels - 1
    other = next(u for u in mutator.mutable_units if u is not unit)
    assert other.active_channels == other.num_channels
    if normalization == "flops" and max(cost.values()) == 1e12:  # a channel that saves a lot goes first
        assert cost[unit.name] == 1e12


def test_compact_training_records_the_same_fisher_as_gather_mode():
    results = []
    for compact in (False, True):
        algorithm = algorithm_for(interval=2)
        with algorithm.full_size():
            algorithm.mutator.set_choices({"c0_(0, 8)_8": 5})  # L1-ranked kept channels, not a prefix
        optimizer = torch.optim.SGD(algorithm.model.parameters(), lr=0.0)
        if compact:
            algorithm.start_compact_training(optimizer)
        x, y = data(batch=4)
        F.cross_entropy(algorithm.model(x), y).backward()
        algorithm.after_backward()
        results.append({u.name: u.normalized_fisher_info.clone() for u in algorithm.mutator.mutable_units})
        assert algorithm.step()  # a pruning step in compact mode runs on full-size tensors
        if compact:
            assert algorithm.compact_training
            algorithm.stop_compact_training()
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name])


def test_a_resumed_run_prunes_as_the_uninterrupted_one():
    whole = algorithm_for(interval=2, budget={"flops": 0.4})
    run(whole, 9, seed=3)
    first = algorithm_for(interval=2, budget={"flops": 0.4})
    run(first, 5, seed=3)
    state = copy.deepcopy(first.state_dict())
    weights = copy.deepcopy(first.model.state_dict())
    resumed = algorithm_for(interval=2, budget={"flops": 0.4})
    resumed.model.load_state_dict(weights)
    resumed.load_state_dict(state)
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator))
               for _ in range(9)]
    optimizer = torch.optim.SGD(resumed.model.parameters(), lr=0.05)
    for x, y in batches[5:]:
        train_step(resumed.model, resumed, x, y)
        optimizer.step()
        resumed.step()
    assert resumed.counter == whole.counter and resumed.channels_pruned == whole.channels_pruned
    assert kept(resumed) == kept(whole)
    with pytest.raises(ConfigError, match="interval"):
        algorithm_for(interval=3, budget={"flops": 0.4}).load_state_dict(state)


def test_deploy_files_rebuild_the_pruned_model(tmp_path):
    algorithm = algorithm_for(interval=1, budget={"flops": 0.7}, work_dir=str(tmp_path))
    run(algorithm, 20, until_done=True)  # the files are written when the budget is met
    assert algorithm.done
    fix_subnet = json.loads((tmp_path / "fix_subnet.json").read_text())
    assert fix_subnet == algorithm.deploy_config() == algorithm.mutator.current_choices
    assert min(fix_subnet.values()) < 8  # number-mode units (mmrazor's default): kept channel counts
    rebuilt = load_pruned(Wider(), tmp_path / "structure.json", tmp_path / "pruned_model.pt").eval()
    x = torch.randn(2, 3, 8, 8)
    algorithm.model.eval()
    torch.testing.assert_close(rebuilt(x), algorithm.model(x))


def test_an_mmrazor_style_config_builds_the_algorithm():
    MODELS.register_module(name="GroupFisherTestNet", module=Wider, force=True)
    try:
        torch.manual_seed(0)
        algorithm = MODELS.build(dict(
            _scope_="mmrazor", type="GroupFisherAlgorithm", architecture=dict(type="GroupFisherTestNet"),
            interval=10,
            mutator=dict(type="GroupFisherChannelMutator",
                         parse_cfg=dict(type="ChannelAnalyzer", demo_input=(1, 3, 8, 8), tracer_type="FxTracer"),
                         channel_unit_cfg=dict(type="GroupFisherChannelUnit",
                                               default_args=dict(normalization_type="act")))))
    finally:
        MODELS.remove_module("GroupFisherTestNet")
    assert isinstance(algorithm, GroupFisherAlgorithm) and algorithm.interval == 10
    torch.manual_seed(0)  # the model is built before the mutator (whose demo input draws random numbers)
    assert torch.equal(algorithm.model.c0.weight, Wider().c0.weight)
    units = algorithm.mutator.mutable_units
    assert [type(u) for u in units] == [GroupFisherChannelUnit] * 2
    assert {u.normalization_type for u in units} == {"act"}
    assert all(u.init_args["normalization_type"] == "act" for u in units)


@pytest.mark.parametrize("kwargs, match", [
    (dict(interval=0), "interval must be an int >= 1"),
    (dict(budget={"latency": 0.5}), "budget 'latency' is not supported"),
    (dict(budget={"flops": 0.5}, mutator_cfg={}), "give mutator .* or mutator_cfg, not both"),
])
def test_bad_algorithm_arguments_raise_one_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        algorithm_for(**kwargs)


def test_the_algorithm_needs_a_group_fisher_mutator():
    mutator, model = ChannelMutator(parse_cfg=dict(demo_input=(1, 3, 8, 8))), Wider()
    with pytest.raises(ConfigError, match="must be a GroupFisherChannelMutator"):
        GroupFisherAlgorithm(model, mutator)
    assert not mutator.units and type(model.c0) is nn.Conv2d  # nothing prepared


# --------------------------------------------------------------------------------------------------------- DDP
# (two gloo ranks run a GroupFisher step in tests/test_ddp.py, whose processes are already spawned)
class FakeTwoRanks:
    """Stands in for ``torch.distributed`` with two ranks: ``all_reduce`` adds the other rank's tensor."""

    def __init__(self, other):
        self.other, self.calls = other, 0

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self, group=None):
        return 2

    def all_reduce(self, tensor, group=None):
        self.calls += 1
        tensor += self.other(tensor)


def test_all_units_are_summed_over_the_ranks_in_one_all_reduce(monkeypatch):
    import pyprune.mutators.group_fisher as module
    model, mutator, _ = prepared()
    mutator.start_record_info()
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    local = {u.name: u.batch_fisher() for u in mutator.mutable_units}
    fake = FakeTwoRanks(lambda flat: torch.arange(flat.numel(), dtype=flat.dtype))  # the "other rank's" values
    monkeypatch.setattr(module, "dist", fake)
    mutator.update_importance()
    assert fake.calls == 1
    other = torch.arange(10, dtype=torch.float64)  # flattened in unit order: stem (6 channels), then branches (4)
    close(mutator._by_name[STEM].normalized_fisher_info, local[STEM] + other[:6])
    close(mutator._by_name[BRANCHES].normalized_fisher_info, local[BRANCHES] + other[6:])
    with pytest.raises(ConfigError, match="tensor 1 is torch.float32"):
        module.sum_over_ranks([torch.zeros(2, dtype=torch.float64), torch.zeros(2)])
