"""Slimmable training: SwitchableBatchNorm2d (a private BN per candidate width), the slimmable units installing it,
SlimmableChannelMutator's subnets and SlimmableNetwork's sandwich step, export of one width with that width's BN,
checkpoints, config errors, and mmrazor's published slimmable MobileNetV2 structure."""
import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from helpers import join_two_rank_gloo, run_two_ranks
from pyprune.algorithms import SlimmableNetwork
from pyprune.errors import ChannelSelectionError, ConfigError
from pyprune.mutators import SlimmableChannelMutator
from pyprune.ops import DynamicBatchNorm2d, SwitchableBatchNorm2d

FIXTURES = Path(__file__).parent / "compat" / "fixtures"
PARSE = dict(type="ChannelAnalyzer", demo_input=(1, 3, 8, 8), tracer_type="BackwardTracer")
TOL = dict(rtol=1e-5, atol=1e-5)  # export vs dynamic model: the same float32 ops on copied tensors


class ThreeConvNet(nn.Module):
    """conv-bn-relu x3 (16, 16, 32 channels), global average pool, linear to 5 classes. Input ``[N, 3, 8, 8]``."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


UNITS = ("conv0_(0, 16)_16", "conv1_(0, 16)_16", "conv2_(0, 32)_32")
# mmrazor's layout: subnet i takes entry i of every unit's candidate_choices (number mode)
UNITS_CFG = {UNITS[0]: {"init_args": {"num_channels": 16, "candidate_choices": [4, 8, 16]}},
             UNITS[1]: {"init_args": {"num_channels": 16, "candidate_choices": [4, 12, 16]}},
             UNITS[2]: {"init_args": {"num_channels": 32, "candidate_choices": [8, 16, 32]}}}


def mutator_cfg(units=None):
    return dict(type="SlimmableChannelMutator", parse_cfg=dict(PARSE),
                channel_unit_cfg=dict(type="SlimmableChannelUnit", units=copy.deepcopy(units or UNITS_CFG)))


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return SlimmableNetwork(ThreeConvNet(), mutator_cfg(), **kwargs)


def batch(seed=1, n=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=generator), torch.randint(0, 5, (n,), generator=generator)


def train(algorithm, steps=3, lr=0.05):
    optimizer = torch.optim.SGD(algorithm.model.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        algorithm.train_step(*batch(step), optimizer, F.cross_entropy)
    return optimizer


# ----------------------------------------------------------------------------------------- SwitchableBatchNorm2d
def test_switchable_bn_keeps_each_widths_statistics_apart():
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    op = SwitchableBatchNorm2d.convert_from(bn)
    op.init_candidates([2, 4, 8])
    assert op.candidate_widths == [2, 4, 8] and sorted(op.candidate_bn) == ["2", "4"]
    # each width starts from the first K channels of the full BN
    torch.testing.assert_close(op.candidate_bn["4"].running_mean, bn.running_mean[:4])
    before = {name: t.clone() for name, t in op.state_dict().items()}
    op.train()
    op.set_out_channels(4)
    op(torch.randn(6, 4, 3, 3) * 3 + 1)
    after = op.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"candidate_bn.4.running_mean", "candidate_bn.4.running_var",
                       "candidate_bn.4.num_batches_tracked"}


def test_switchable_bn_export_is_the_widths_bn_and_other_widths_are_refused():
    op = SwitchableBatchNorm2d.convert_from(nn.BatchNorm2d(8))
    op.init_candidates([4, 8])
    with torch.no_grad():
        op.candidate_bn["4"].weight.uniform_(0.5, 1.5), op.candidate_bn["4"].running_var.uniform_(0.5, 2)
    op.eval()
    op.set_out_channels(4)
    static = op.export()
    assert type(static) is nn.BatchNorm2d and static.num_features == 4 and not static.training
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(static(x), op(x), **TOL)
    assert static.weight is not op.candidate_bn["4"].weight  # a copy: training the export leaves the op alone
    op.set_out_channels(3)
    with pytest.raises(ChannelSelectionError, match=r"SwitchableBatchNorm2d\): 3 active channels .*\[4, 8\]"):
        op(torch.randn(2, 3, 3, 3))
    with pytest.raises(ConfigError, match="candidate widths must be channel counts in \\[1, 8\\]"):
        SwitchableBatchNorm2d.convert_from(nn.BatchNorm2d(8)).init_candidates([4, 9])


# ------------------------------------------------------------------------------------- units install switchable BN
def test_slimmable_units_install_switchable_bn_with_their_candidate_counts():
    algorithm = build()
    model = algorithm.model
    assert all(type(getattr(model, f"bn{i}")) is SwitchableBatchNorm2d for i in range(3))
    assert model.bn1.candidate_widths == [4, 12, 16] and model.bn2.candidate_widths == [8, 16, 32]
    assert algorithm.mutator.subnets == [{UNITS[0]: 4, UNITS[1]: 4, UNITS[2]: 8},
                                         {UNITS[0]: 8, UNITS[1]: 12, UNITS[2]: 16},
                                         {UNITS[0]: 16, UNITS[1]: 16, UNITS[2]: 32}]
    assert algorithm.mutator.min_choices == {UNITS[0]: 4, UNITS[1]: 4, UNITS[2]: 8}
    assert algorithm.mutator.config_template()["type"] == "SlimmableChannelMutator"


def test_training_one_width_leaves_every_other_widths_bn_unchanged():
    algorithm = build()
    model, mutator = algorithm.model, algorithm.mutator
    before = {name: t.clone() for name, t in model.state_dict().items() if ".bn" in f".{name}"}
    mutator.set_choices(mutator.subnets[1])
    model.train()
    model(batch()[0])
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    expected = {f"bn{i}.candidate_bn.{k}.{stat}" for i, k in ((0, 8), (1, 12), (2, 16))
                for stat in ("running_mean", "running_var", "num_batches_tracked")}
    assert changed == expected
    # a backward at that width reaches only that width's BN parameters
    model.zero_grad()
    model(batch()[0]).sum().backward()
    with_grad = {name for name, p in model.named_parameters() if ".bn" in f".{name}" and p.grad is not None}
    assert with_grad == {f"bn{i}.candidate_bn.{k}.{p}" for i, k in ((0, 8), (1, 12), (2, 16))
                         for p in ("weight", "bias")}


# -------------------------------------------------------------------------------------------------- the step
def test_sandwich_step_accumulates_the_mean_loss_of_every_width_and_steps_once():
    algorithm = build(num_random_samples=2)
    replay = copy.deepcopy(algorithm.model)
    inputs, targets = batch()
    optimizer = torch.optim.SGD(algorithm.model.parameters(), lr=0.1)
    start = algorithm.mutator.current_choices
    losses = algorithm.train_step(inputs, targets, optimizer, F.cross_entropy)
    assert list(losses) == ["max_subnet.loss", "min_subnet.loss", "random0_subnet.loss", "random1_subnet.loss"]
    assert algorithm.last_choices[0] == algorithm.mutator.max_choices
    assert algorithm.last_choices[1] == algorithm.mutator.min_choices
    assert algorithm.mutator.current_choices == start  # the widths set before the step are back
    # the same widths replayed by hand on a copy: gradients of loss / 4 summed, one SGD step
    replay_units = {name: unit for name, unit in zip(UNITS, _units_of(algorithm))}
    grads = {name: torch.zeros_like(p) for name, p in replay.named_parameters()}
    for choices, (kind, loss) in zip(algorithm.last_choices, losses.items()):
        _apply_widths(replay, replay_units, choices)
        replay.zero_grad()
        replayed = F.cross_entropy(replay(inputs), targets)
        torch.testing.assert_close(replayed.detach(), loss, **TOL)
        (replayed / 4).backward()
        for name, p in replay.named_parameters():
            if p.grad is not None:
                grads[name] += p.grad
    moved = 0
    for (name, p), (_, old) in zip(algorithm.model.named_parameters(), replay.named_parameters()):
        torch.testing.assert_close(p.detach(), old.detach() - 0.1 * grads[name], **TOL)
        moved += int(not torch.equal(p.detach(), old.detach()))
    assert moved > 0 and all(v.abs().sum() > 0 for k, v in grads.items() if k.startswith("conv"))


def _units_of(algorithm):
    return [algorithm.mutator._by_name[name] for name in UNITS]


def _apply_widths(model, units, choices):
    """Set the widths on a deep copy of the prepared model: each unit's layers, by the same prefix counts."""
    for name, count in choices.items():
        for ref in units[name].related_refs:
            layer = model.get_submodule(ref.name)
            index = None if count == units[name].num_channels else torch.arange(count)
            (layer.set_out_index if ref.is_output_channel else layer.set_in_index)(index)


def test_subnets_schedule_runs_mmrazors_subnets_in_order():
    algorithm = build(schedule="subnets")
    losses = algorithm.train_step(*batch(), torch.optim.SGD(algorithm.model.parameters(), lr=0.1),
                                  F.cross_entropy)
    assert list(losses) == ["subnet_0.loss", "subnet_1.loss", "subnet_2.loss"]
    assert algorithm.last_choices == algorithm.mutator.subnets


# ------------------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def trained():
    """Three sandwich steps: every width's BN has its own, different statistics now."""
    algorithm = build()
    train(algorithm)
    algorithm.model.eval()
    return algorithm


@pytest.mark.parametrize("width", [0, 1, 2, "max", "min", {UNITS[0]: 8, UNITS[1]: 4, UNITS[2]: 32}])
def test_export_at_every_width_equals_the_dynamic_model_there_in_eval_mode(trained, width):
    algorithm = trained
    x = batch(7)[0]
    small = algorithm.export(width).eval()
    choices = algorithm._width_choices(width)
    before = algorithm.mutator.current_choices
    algorithm.mutator.set_choices(choices)
    try:
        with torch.no_grad():
            torch.testing.assert_close(small(x), algorithm.model(x), **TOL)
    finally:
        algorithm.mutator.set_choices(before)
    bns = [small.bn0, small.bn1, small.bn2]
    assert all(type(bn) is nn.BatchNorm2d for bn in bns)
    assert [bn.num_features for bn in bns] == [choices[name] for name in UNITS]
    for i, (bn, name) in enumerate(zip(bns, UNITS)):  # the width's own statistics, not a slice of the full BN's
        switchable = getattr(algorithm.model, f"bn{i}")
        source = switchable if choices[name] == switchable.num_features else \
            switchable.candidate_bn[str(choices[name])]
        torch.testing.assert_close(bn.running_mean, source.running_mean)
        assert not torch.equal(bn.running_mean, switchable.running_mean[:choices[name]]) or source is switchable
    assert not any(isinstance(m, DynamicBatchNorm2d) for m in small.modules())


def test_deploy_index_fixes_the_model_at_that_subnet():
    torch.manual_seed(0)
    algorithm = SlimmableNetwork(ThreeConvNet(), mutator_cfg(), deploy_index=1)
    assert algorithm.is_deployed and algorithm.model.conv1.out_channels == 12
    optimizer = torch.optim.SGD(algorithm.model.parameters(), lr=0.1)
    before = algorithm.model.conv0.weight.detach().clone()
    assert set(algorithm.train_step(*batch(), optimizer, F.cross_entropy)) == {"loss"}
    assert not torch.equal(before, algorithm.model.conv0.weight)


# ------------------------------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_restores_every_widths_bn():
    algorithm = build()
    train(algorithm, steps=2)
    algorithm.mutator.set_choices(algorithm.mutator.subnets[1])
    saved_model, saved_algorithm = algorithm.model.state_dict(), algorithm.state_dict()
    assert "bn1.candidate_bn.12.running_mean" in saved_model
    fresh = build(seed=5)
    fresh.model.load_state_dict(saved_model)
    fresh.load_state_dict(saved_algorithm)
    assert fresh.iteration == 2 and fresh.mutator.current_choices == algorithm.mutator.current_choices
    x = batch(9)[0]
    algorithm.model.eval(), fresh.model.eval()
    for index in range(3):
        for which in (algorithm, fresh):
            which.mutator.set_choices(which.mutator.subnets[index])
        with torch.no_grad():
            torch.testing.assert_close(fresh.model(x), algorithm.model(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="schedule='sandwich'"):
        build(schedule="subnets").load_state_dict(saved_algorithm)


def test_a_resumed_run_draws_the_same_widths_and_ends_with_the_same_weights():
    def steps(algorithm, optimizer, start, count):
        for step in range(start, start + count):
            algorithm.train_step(*batch(step), optimizer, F.cross_entropy)

    straight = build()
    optimizer = torch.optim.SGD(straight.model.parameters(), lr=0.05, momentum=0.9)
    steps(straight, optimizer, 0, 2)
    saved = (copy.deepcopy(straight.model.state_dict()), copy.deepcopy(optimizer.state_dict()),
             straight.state_dict())
    steps(straight, optimizer, 2, 2)
    resumed = build(seed=3)  # other weights and another generator until the checkpoint is loaded
    resumed.model.load_state_dict(saved[0])
    resumed.load_state_dict(saved[2])
    optimizer = torch.optim.SGD(resumed.model.parameters(), lr=0.05, momentum=0.9)
    optimizer.load_state_dict(saved[1])
    steps(resumed, optimizer, 2, 2)
    assert resumed.last_choices == straight.last_choices
    assert resumed.mutator.current_choices == straight.mutator.current_choices
    tensors = {name: t for name, t in resumed.model.state_dict().items() if isinstance(t, torch.Tensor)}
    for name, tensor in straight.model.state_dict().items():
        if isinstance(tensor, torch.Tensor):  # (the units' selection rides in the state_dict as a dict)
            assert torch.equal(tensor, tensors[name]), name


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    join_two_rank_gloo(rank, port)
    try:
        algorithm = build()  # one seed on every rank: the same weights and the same widths
        ddp = nn.parallel.DistributedDataParallel(algorithm.model, find_unused_parameters=True,
                                                  broadcast_buffers=False)
        optimizer = torch.optim.SGD(algorithm.model.parameters(), lr=0.05)
        for step in range(2):
            algorithm.train_step(*batch(10 * rank + step), optimizer, F.cross_entropy, model=ddp)
        torch.save({"params": {k: p.detach().clone() for k, p in algorithm.model.named_parameters()},
                    "choices": algorithm.last_choices}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_two_gloo_ranks_on_different_data_keep_identical_weights(tmp_path):
    rank0, rank1 = run_two_ranks(_rank_worker, tmp_path, 120)
    assert rank0["choices"] == rank1["choices"]
    for name, tensor in rank0["params"].items():
        torch.testing.assert_close(tensor, rank1["params"][name], rtol=1e-5, atol=1e-6, msg=name)
    # each rank alone on its own data would have moved elsewhere: the gradients were averaged
    alone = build()
    optimizer = torch.optim.SGD(alone.model.parameters(), lr=0.05)
    for step in range(2):
        alone.train_step(*batch(step), optimizer, F.cross_entropy)
    assert not torch.allclose(alone.model.conv0.weight, rank0["params"]["conv0.weight"])


# ---------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("kwargs, key", [
    (dict(num_random_samples=-1), "num_random_samples"),
    (dict(num_random_samples=1.5), "num_random_samples"),
    (dict(deploy_index=3), "deploy_index 3 is out of range"),
    (dict(deploy_index=True), "deploy_index"),
    (dict(schedule="all"), "schedule"),
    (dict(seed="1"), "seed"),
    (dict(mutator_cfg=dict(type="ChannelMutator")), "SlimmableChannelMutator"),
])
def test_bad_algorithm_config_values_raise_one_error_naming_the_key_and_leave_the_model_alone(kwargs, key):
    model = ThreeConvNet()
    mutator = kwargs.pop("mutator_cfg", mutator_cfg())
    with pytest.raises(ConfigError, match=key):
        SlimmableNetwork(model, mutator, **kwargs)
    assert not any(isinstance(m, DynamicBatchNorm2d) for m in model.modules())


def test_bad_mutator_config_values_name_the_unit_and_key():
    uneven = copy.deepcopy(UNITS_CFG)
    uneven[UNITS[2]]["init_args"]["candidate_choices"] = [8, 32]
    with pytest.raises(ConfigError, match=r"units\['conv2_\(0, 32\)_32'\]\.init_args\.candidate_choices has 2"):
        SlimmableChannelMutator(dict(type="SlimmableChannelUnit", units=uneven))
    missing = copy.deepcopy(UNITS_CFG)
    del missing[UNITS[1]]["init_args"]["candidate_choices"]
    with pytest.raises(ConfigError, match=r"conv1_\(0, 16\)_16'\]\.init_args\.candidate_choices is missing"):
        SlimmableChannelMutator(dict(type="SlimmableChannelUnit", units=missing))
    with pytest.raises(ConfigError, match="channel_unit_cfg.type must be SlimmableChannelUnit"):
        SlimmableChannelMutator("SequentialMutableChannelUnit")
    algorithm = build()
    with pytest.raises(ConfigError, match="width 3 is not a subnet index"):
        algorithm.export(3)
    with pytest.raises(ChannelSelectionError, match="not one of the candidate choices"):
        algorithm.export({UNITS[0]: 5})
    with pytest.raises(ConfigError, match="gather mode"):
        algorithm.start_compact_training(torch.optim.SGD(algorithm.model.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="model must be the algorithm's model"):
        algorithm.train_step(*batch(), torch.optim.SGD(algorithm.model.parameters(), lr=0.1), F.cross_entropy,
                             model=ThreeConvNet())
    with pytest.raises(ConfigError, match="'generator' must be the uint8 state"):
        algorithm.load_state_dict({**algorithm.state_dict(), "generator": 7})


def test_default_args_candidates_give_uniform_subnets():
    torch.manual_seed(0)
    cfg = dict(type="SlimmableChannelMutator", parse_cfg=dict(PARSE), channel_unit_cfg=dict(
        type="SlimmableChannelUnit", default_args=dict(candidate_choices=[0.25, 0.5, 1.0], choice_mode="ratio")))
    algorithm = SlimmableNetwork(ThreeConvNet(), cfg, schedule="subnets")
    assert [set(s.values()) for s in algorithm.mutator.subnets] == [{0.25}, {0.5}, {1.0}]
    assert algorithm.export(0).conv2.out_channels == 8


# ------------------------------------------------------------------------------------ mmrazor's published units
@pytest.mark.slow
@pytest.mark.parametrize("width", [0, 1, "max"])
def test_budget_cost_of_a_width_counts_the_params_and_flops_of_its_export(trained, width):
    # the per-width BNs live in the supernet only: the cost model must not count them as fixed parameters
    from pyprune.budget.cost import subnet_cost
    from pyprune.mutators.summary import count_flops, count_params
    algorithm = trained
    small = algorithm.export(width).eval()
    before = algorithm.mutator.current_choices
    algorithm.mutator.set_choices(algorithm._width_choices(width))
    try:
        cost = subnet_cost(algorithm.model, algorithm.mutator)
    finally:
        algorithm.mutator.set_choices(before)
    assert cost.params == count_params(small)
    assert cost.flops == count_flops(small, torch.zeros(1, 3, 8, 8))


def test_published_slimmable_mobilenet_v2_loads_and_exports_each_subnet_with_its_bn():
    """AutoSlim's slimmable MobileNetV2 1.5x units file (three subnets; candidate lists repeat widths) on the
    mmcls-named model: switchable BNs installed without warnings, and each subnet's export equals the slimmable
    model at that subnet (eval mode, rtol = atol = 1e-4)."""
    from compat.models import MMClsMobileNetV2
    units = json.loads((FIXTURES / "slimmable_mbv2_1.5x.json").read_text())["units"]
    torch.manual_seed(0)
    model = MMClsMobileNetV2(num_classes=10, widen_factor=1.5)
    parse = dict(type="ChannelAnalyzer", demo_input=(1, 3, 16, 16), tracer_type="BackwardTracer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        algorithm = SlimmableNetwork(model, dict(type="SlimmableChannelMutator", parse_cfg=parse, channel_unit_cfg=dict(
            type="SlimmableChannelUnit", units=units)))
    assert algorithm.num_subnet == 3 and {u.name for u in algorithm.mutator.mutable_units} == set(units)
    switchable = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    assert switchable and not any(type(m) is DynamicBatchNorm2d for m in model.modules())
    with torch.no_grad():  # every width's BN its own values, so an export holding another width's would show
        for bn in switchable:
            for candidate in bn.candidate_bn.values():
                candidate.weight.uniform_(0.5, 1.5), candidate.running_mean.uniform_(-0.5, 0.5)
                candidate.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    for index in range(3):
        small = algorithm.export(index).eval()
        algorithm.mutator.set_choices(algorithm.mutator.subnets[index])
        with torch.no_grad():
            torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-4)
