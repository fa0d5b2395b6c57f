"""DMCP: the units' Markov chain over channel groups, the scaled forward of the architecture step against a hand
computation, the expected FLOPs against the layers' arithmetic and the exported model, a search run on random data
(architecture parameters move, the FLOPs loss falls, the derived subnet meets the target, export equals dynamic),
resume, bad config values, and mmrazor's published DMCP supernet config on a small MobileNetV2."""
import copy
import io
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from compat.models import MMClsMobileNetV2
from helpers import join_two_rank_gloo, run_two_ranks
from pyprune.algorithms import DMCP
from pyprune.algorithms.dmcp import FLOPS_PER_MAC
from pyprune.budget.errors import BudgetError
from pyprune.compat import mmrazor
from pyprune.errors import ConfigError
from pyprune.mutators import DMCPChannelMutator, count_flops
from pyprune.registry import MODELS
from pyprune.units import DMCPChannelUnit

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
STEM, BODY = "c1_(0, 16)_16", "c2_(0, 32)_32"
GRID = (0.25, 1, 0.25)  # a 25 % prefix and 3 groups of 25 %: a small model still has groups
SIZE = 8


class ResNetlet(nn.Module):
    """conv-BN (16) -> conv-BN (32) -> conv-BN (32) + residual -> mean -> linear (4). x ``[N, 3, 8, 8]``; units
    ``c1`` (16 channels, one BN) and ``c2`` (32 channels, produced by two BNs whose outputs are added)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.b3(self.c3(x)) + x)
        return self.fc(x.mean((2, 3)))

    def scaled(self, x, s1, s2):
        """The forward with per-channel scales ``s1`` ``[16]`` / ``s2`` ``[32]`` on the BN outputs (the hand
        computation of DMCP's scaled forward)."""
        x = F.relu(self.b1(self.c1(x)) * s1.view(1, -1, 1, 1))
        x = F.relu(self.b2(self.c2(x)) * s2.view(1, -1, 1, 1))
        x = F.relu(self.b3(self.c3(x)) * s2.view(1, -1, 1, 1) + x)
        return self.fc(x.mean((2, 3)))


def mutator_cfg(pruning_cfg=GRID):
    return dict(type="DMCPChannelMutator", pruning_cfg=pruning_cfg, parse_cfg=dict(demo_input=(1, 3, SIZE, SIZE)))


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(target_flops=0.5, arch_start_train=0, arch_train_freq=1, flop_loss_weight=1.0, seed=seed,
                strategy=["max", "min", "scheduled_random", "arch_random"])
    return DMCP(ResNetlet(), mutator_cfg=mutator_cfg(), **{**args, **kwargs})


def optimizers(algorithm):
    return {"architecture": torch.optim.SGD(algorithm.model.parameters(), lr=0.05, momentum=0.9),
            "mutator": torch.optim.Adam(algorithm.arch_parameters(), lr=0.5, weight_decay=1e-3)}


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def data(seed=1, n=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def units(algorithm):
    return {u.name: u for u in algorithm.mutator.mutable_units}


# ------------------------------------------------------------------------------------------------------ the chain
def test_unit_grid_and_chain_follow_mmrazors_formulas():
    unit = DMCPChannelUnit(64, name="u")
    unit.set_pruning_cfg((0.1, 1, 0.05))  # mmrazor's default: group_size int(0.05 * 64) = 3, 18 groups
    assert unit.arch_attr == (3, 18, 64 - 54)
    assert (unit.grid_count(0), unit.grid_count(18)) == (10, 64)
    a = torch.tensor([0.0] * 16 + [0.5, 1.0])
    marginal = unit.marginal_probabilities(a)
    torch.testing.assert_close(marginal[-2:], torch.tensor([0.5, 1.5]).neg().exp())
    torch.testing.assert_close(unit.expected_channels(a), 10 + 3 * marginal.sum())
    assert unit.expected_count(a) == int(10 + 3 * float(marginal.sum()))
    # a grouped unit: the grid is per block, the scale repeats per block
    grouped = DMCPChannelUnit(32, groups=2, name="g")
    grouped.set_pruning_cfg(GRID)
    assert grouped.arch_attr == (4, 3, 4) and grouped.grid_count(1) == 16
    scale = grouped.channel_scale(torch.tensor([0.0, 1.0, 2.0]))
    assert scale.shape == (32,) and torch.equal(scale[:16], scale[16:]) and torch.equal(scale[:4], torch.ones(4))
    # the gradient passes at a == 0 (where every parameter starts) and stops below it
    a = torch.tensor([0.0, -1.0, 2.0], requires_grad=True)
    unit.set_pruning_cfg(GRID)
    unit.expected_channels(a).backward()
    assert a.grad[0] < 0 and a.grad[1] == 0 and a.grad[2] < 0
    # direct sampling: certain transitions give the full width, a zero transition stops the chain there
    generator = torch.Generator().manual_seed(0)
    assert unit.sample_chain(torch.zeros(3), generator) == 64
    assert unit.sample_chain(torch.tensor([0.0, 1e4, 0.0]), generator) == unit.grid_count(1)
    assert {unit.sample_grid(generator) for _ in range(200)} == {unit.grid_count(k) for k in range(4)}


def test_scaled_forward_and_its_gradient_equal_the_hand_computation():
    algorithm = build()
    model, mutator = algorithm.model, algorithm.mutator
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for param, values in zip(algorithm.arch_parameters(), ([0.3, 0.0, 1.2], [0.1, 0.7, 0.0])):
            param.copy_(torch.tensor(values))
    x, y = data()
    model.eval()
    mutator.sample_subnet("max", True)
    loss = loss_fn(model, (x, y))
    grads = torch.autograd.grad(loss, algorithm.arch_parameters())
    mutator.modify_supernet_forward(False)

    hand = [p.detach().clone().requires_grad_() for p in algorithm.arch_parameters()]
    s1 = units(algorithm)[STEM].channel_scale(hand[0])
    s2 = units(algorithm)[BODY].channel_scale(hand[1])
    assert s1[:4].eq(1).all() and s1[4:8].eq((-0.3 * torch.ones(4)).exp()).all()
    reference_loss = F.cross_entropy(reference.eval().scaled(x, s1, s2), y)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(grads, torch.autograd.grad(reference_loss, hand)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    # unscaled again once arch_train is off; a narrower subnet scales only its active channels (gather regime)
    torch.testing.assert_close(model(x), reference(x))
    mutator.apply_counts({STEM: 8, BODY: 16})
    mutator.modify_supernet_forward(True, detach=True)
    narrow = model(x)
    copied = copy.deepcopy(model)  # a copy (an export, an EMA model) carries the hooks inert
    mutator.modify_supernet_forward(False)
    assert narrow.shape == (8, 4) and not torch.allclose(narrow, model(x))
    torch.testing.assert_close(copied(x), model(x))


def test_expected_flops_are_the_layers_bilinear_cost_and_the_exported_count():
    algorithm = build()
    stem, body = algorithm.arch_parameters()
    with torch.no_grad():
        stem.copy_(torch.tensor([0.2, 0.5, 0.1]))
        body.copy_(torch.tensor([0.0, 0.3, 0.9]))
    e1 = units(algorithm)[STEM].expected_channels(stem)
    e2 = units(algorithm)[BODY].expected_channels(body)
    hw = SIZE * SIZE
    # FlopCounterMode: 2 per multiply-add of convs and the linear layer; BN, ReLU, mean and adds count nothing
    hand = 2 * (hw * 27 * e1 + hw * 9 * e1 * e2 + hw * 9 * e2 * e2 + e2 * 4)
    expected = algorithm.expected_flops()
    torch.testing.assert_close(expected, hand, rtol=1e-6, atol=0)
    g_ours = torch.autograd.grad(expected, [stem, body], retain_graph=True)
    g_hand = torch.autograd.grad(hand, [stem, body])
    for ours, theirs in zip(g_ours, g_hand):
        torch.testing.assert_close(ours, theirs)
    # certain transitions: the expectation is a grid subnet, whose export counts the same FLOPs
    with torch.no_grad():
        stem.copy_(torch.tensor([0.0, 0.0, 1e4]))
        body.copy_(torch.tensor([0.0, 1e4, 0.0]))
    counts = algorithm.derive_subnet()
    assert counts == {STEM: 12, BODY: 16}
    small = algorithm.export()
    assert float(algorithm.expected_flops().detach()) == count_flops(small, torch.randn(1, 3, SIZE, SIZE)) \
        == algorithm.current_flops()


# ------------------------------------------------------------------------------------------------------- a search
def test_search_moves_the_arch_params_meets_the_target_and_exports(tmp_path):
    algorithm = build()
    optim = optimizers(algorithm)
    target = algorithm.target_flops * FLOPS_PER_MAC * 1e6
    start = float(algorithm.expected_flops().detach())
    assert start == algorithm.full_flops > target
    batch = data()
    history = [algorithm.train_step(batch, loss_fn, optim) for _ in range(20)]
    assert sorted(history[0]) == ["max_subnet1.loss", "min_subnet1.loss", "random_subnet1.loss",
                                  "random_subnet2.loss"]  # iteration 0: the architecture is not trained yet
    assert {"arch.loss", "flops.loss", "direct_subnet1.loss"} <= set(history[1])
    assert all(p.abs().max() > 0.1 for p in algorithm.arch_parameters())
    flops_losses = [float(h["flops.loss"]) for h in history[1:]]
    assert min(flops_losses[-5:]) < flops_losses[0]
    end = float(algorithm.expected_flops().detach())
    assert abs(end - target) < 0.25 * abs(start - target)

    counts = algorithm.derive_subnet()
    flops = algorithm.current_flops()
    # within one channel group of the target: no unit's next group costs less than the miss
    one_group = max(algorithm.cost_model.cost({name: min(unit.num_channels, counts[name] + unit.group_size)}).flops
                    - flops for name, unit in units(algorithm).items())
    assert abs(flops - target) <= one_group, (flops, target, one_group)
    assert counts[STEM] < 16 or counts[BODY] < 32

    small = algorithm.export()
    x = torch.randn(4, 3, SIZE, SIZE)
    algorithm.model.eval()
    small.eval()
    assert small.c2.out_channels == counts[BODY] and small.c1.out_channels == counts[STEM]
    torch.testing.assert_close(small(x), algorithm.model(x), rtol=1e-5, atol=1e-5)
    assert count_flops(small, torch.randn(1, 3, SIZE, SIZE)) == flops
    # mmrazor's subnet hook: chain-drawn subnets within 5 % of the target (its 5 % widened here to one group)
    drawn = algorithm.sample_direct_subnet(tolerance=one_group / target)
    assert abs(algorithm.current_flops() - target) <= one_group and drawn == algorithm.mutator.current_choices
    with pytest.raises(BudgetError, match="within 0% of target_flops"):
        algorithm.sample_direct_subnet(tolerance=0.0, max_tries=3)
    assert algorithm.mutator.current_choices == drawn
    algorithm.derive_subnet()
    # the subnet file (mmrazor's DMCP subnet layout) sets the same widths on a fresh model
    path = algorithm.save_subnet(str(tmp_path / "subnet.json"))
    config = json.loads(open(path).read())
    assert config["type"] == "DMCPChannelMutator" and config["channel_unit_cfg"]["type"] == "DMCPChannelUnit"
    assert {name: unit["choice"] for name, unit in config["channel_unit_cfg"]["units"].items()} == counts
    fresh = ResNetlet()
    mutator = DMCPChannelMutator.from_config(config)
    mutator.prepare_from_supernet(fresh)
    assert mutator.current_choices == counts
    assert count_flops(mutator.export(fresh), torch.randn(1, 3, SIZE, SIZE)) == flops


def test_resume_mid_run_reproduces_the_uninterrupted_run():
    batch = data()
    whole = build()
    optim = optimizers(whole)
    for _ in range(8):
        whole.train_step(batch, loss_fn, optim)

    first = build()
    optim = optimizers(first)
    for _ in range(4):
        first.train_step(batch, loss_fn, optim)
    buffer = io.BytesIO()
    torch.save({"algorithm": first.state_dict(), "model": first.model.state_dict(),
                "optim": {key: o.state_dict() for key, o in optim.items()}}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = build(seed=5)  # other weights and another generator seed: everything comes from the checkpoint
    resumed.model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["algorithm"])
    optim = optimizers(resumed)
    for key, state in saved["optim"].items():
        optim[key].load_state_dict(state)
    for _ in range(4):
        resumed.train_step(batch, loss_fn, optim)

    assert resumed.counter == whole.counter == 8 and resumed.cur_sample_prob == whole.cur_sample_prob
    for ours, theirs in zip(resumed.arch_parameters(), whole.arch_parameters()):
        assert torch.equal(ours, theirs)
    ours, theirs = resumed.model.state_dict(), whole.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, theirs[name]), name
    assert resumed.derive_subnet() == whole.derive_subnet()


def test_load_state_dict_refuses_another_run_and_changes_nothing():
    algorithm = build()
    state = algorithm.state_dict()
    with torch.no_grad():
        algorithm.arch_parameters()[0].fill_(0.4)
    for key, value, match in (("target_flops", 9.0, "target_flops=9.0"),
                              ("arch_params", {STEM: torch.zeros(2)}, "missing units")):
        with pytest.raises(ConfigError, match=match):
            algorithm.load_state_dict({**state, key: value})
        assert algorithm.arch_parameters()[0].eq(0.4).all()


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    join_two_rank_gloo(rank, port)
    try:
        algorithm = build()  # one seed on every rank: the same weights and the same subnets
        ddp = nn.parallel.DistributedDataParallel(algorithm.model)
        optim = optimizers(algorithm)
        batch = data(seed=10 + rank)  # different data per rank
        for _ in range(3):
            algorithm.train_step(batch, loss_fn, optim, model=ddp)
        torch.save({"arch": [p.detach().clone() for p in algorithm.arch_parameters()],
                    "weights": {k: v for k, v in algorithm.model.state_dict().items() if isinstance(v, torch.Tensor)},
                    "subnet": algorithm.derive_subnet()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_two_gloo_ranks_on_different_data_stay_identical(tmp_path):
    rank0, rank1 = run_two_ranks(_rank_worker, tmp_path, 120)
    for a, b in zip(rank0["arch"], rank1["arch"]):
        assert torch.equal(a, b) and a.abs().max() > 0
    assert rank0["weights"].keys() == rank1["weights"].keys()
    for name, tensor in rank0["weights"].items():
        if "running" not in name and "num_batches" not in name:  # DDP broadcasts buffers before a forward only
            torch.testing.assert_close(tensor, rank1["weights"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert rank0["subnet"] == rank1["subnet"]
    # a rank alone on its data would have moved elsewhere: the reduction did something
    alone = build()
    optim = optimizers(alone)
    for _ in range(3):
        alone.train_step(data(seed=10), loss_fn, optim)
    assert not all(torch.equal(a, b) for a, b in zip(alone.arch_parameters(), rank0["arch"]))


# ------------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("key, value", [
    ("arch_train_freq", 0), ("arch_start_train", 1.5), ("strategy", ["max", "sandwich"]), ("strategy", "max"),
    ("target_flops", -1), ("flops_loss_type", "l3"), ("flop_loss_weight", "big"), ("distillation_times", -2),
])
def test_a_bad_config_value_is_one_error_naming_the_key(key, value):
    model = ResNetlet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=f"DMCP: {key} must be"):
        DMCP(model, mutator_cfg=mutator_cfg(), **{key: value})
    assert all(type(m).__module__.startswith("torch.") for m in model.modules() if m is not model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("pruning_cfg", [(0.1, 1), (0.0, 1, 0.05), (0.5, 0.4, 0.1), "0.1,1,0.05"])
def test_a_bad_pruning_cfg_names_it(pruning_cfg):
    with pytest.raises(ConfigError, match="pruning_cfg"):
        MODELS.build(mutator_cfg(pruning_cfg))


def test_mmrazor_names_and_the_published_supernet_config_on_a_small_mobilenet_v2():
    assert mmrazor.DMCP is DMCP and mmrazor.DMCPChannelMutator is DMCPChannelMutator
    assert mmrazor.DMCPChannelUnit is DMCPChannelUnit
    assert mmrazor.MMRAZOR_MODULES["DMCP"] == "mmrazor.models.algorithms"
    # dmcp_mbv2_supernet_32xb64.py's model dict, on a 0.35x MobileNetV2 at 32 px (iterations scaled down)
    config = dict(type="DMCP", architecture=dict(type="MMClsMobileNetV2", num_classes=10, widen_factor=0.35),
                  distiller=dict(type="ConfigurableDistiller"),
                  mutator_cfg=dict(type="DMCPChannelMutator",
                                   channel_unit_cfg=dict(type="DMCPChannelUnit",
                                                         default_args=dict(choice_mode="number")),
                                   parse_cfg=dict(type="ChannelAnalyzer", demo_input=(1, 3, 32, 32),
                                                  tracer_type="BackwardTracer")),
                  strategy=["max", "min", "scheduled_random", "arch_random"], arch_start_train=1,
                  arch_train_freq=2, flop_loss_weight=0.1, distillation_times=10000, target_flops=0.5, seed=0)
    assert MMClsMobileNetV2 is MODELS.get("MMClsMobileNetV2")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="distiller ignored"):
        algorithm = MODELS.build(config)
    assert isinstance(algorithm.mutator, DMCPChannelMutator)
    conv2 = units(algorithm)["backbone.conv2.conv_(0, 1280)_1280"]
    assert conv2.arch_attr == (64, 18, 128)  # mmrazor's grid on 1280 channels
    optim = optimizers(algorithm)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    for _ in range(3):  # iteration 2 trains the architecture (2 > arch_start_train, 2 % arch_train_freq == 0)
        losses = algorithm.train_step((x, y), loss_fn, optim)
    assert "flops.loss" in losses and float(algorithm.expected_flops().detach()) < algorithm.full_flops
    algorithm.derive_subnet()
    small = algorithm.export().eval()
    algorithm.model.eval()
    assert small.backbone.conv2.conv.out_channels < 1280
    torch.testing.assert_close(small(x), algorithm.model(x), rtol=1e-4, atol=1e-5)
