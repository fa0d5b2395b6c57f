"""DCFF: the temperature curve and the KL criterion against mmrazor's formulas written out, FuseConv's fused filters
against a hand-made convolution, an end-to-end run (schedule steps, rising temperature, export == dynamic), resume
from a checkpoint, bad config values, the deploy files, and mmrazor's published DCFF ResNet-18 config."""
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from helpers import join_two_rank_gloo, run_two_ranks
from pyprune.algorithms.dcff import DCFF, dcff_temperature
from pyprune.errors import ConfigError
from pyprune.mutators import load_pruned
from pyprune.mutators.dcff import DCFFChannelMutator
from pyprune.ops.fuse_conv import FuseConv1d, FuseConv2d
from pyprune.ops.kind_table import dynamic_op_problems
from pyprune.registry import MODELS
from pyprune.units.dcff import DCFFChannelUnit, filter_distribution, kl_scores

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
FIXTURES = Path(__file__).parent / "compat" / "fixtures"
PARSE = dict(type="ChannelAnalyzer", demo_input=(1, 3, 8, 8))
# export vs dynamic forward: the same float32 sums in a different order (the fusion is a matmul either way)
ATOL = RTOL = 1e-5


class ChainNet(nn.Module):
    """conv-bn-relu x3 (the last one depthwise) then a linear head: two DCFF units (c1's and c2's channels; the
    depthwise conv shares c2's), x ``[N, 3, 8, 8]`` -> ``[N, 5]``."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.c2, self.b2 = nn.Conv2d(12, 10, 3, padding=1), nn.BatchNorm2d(10)
        self.dw, self.b3 = nn.Conv2d(10, 10, 3, padding=1, groups=10), nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.b3(self.dw(x)))
        return self.fc(x.mean((2, 3)))


U1, U2 = "c1_(0, 12)_12", "c2_(0, 10)_10"


def batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 5, (4,), generator=generator))
            for _ in range(count)]


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(target_pruning_ratio={U1: 0.5, U2: 0.6}, step_freq=3, max_iters=12, temperature_k=0.3)
    args.update(kwargs)
    return DCFF(ChainNet(), dict(type="DCFFChannelMutator", parse_cfg=PARSE), **args)


def train(algorithm, data, optimizer=None):
    model = algorithm.model.train()
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruned_at = []
    for images, labels in data:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        counter = algorithm.counter
        if algorithm.step():
            pruned_at.append(counter)
    return optimizer, pruned_at


# ------------------------------------------------------------------------------------------------- formulas
def test_temperature_follows_mmrazors_curve():
    # mmrazor's _calc_temperature(cur, max), t_s=1, t_e=10000, k=1, written out
    def mmrazor_tau(cur, top):
        a = 2 * (10000 - 1) * (1 + math.exp(-top)) / (1 - math.exp(-top))
        return 1 / (a / (1 + math.exp(-cur)) + 1 - a / 2)

    for cur in (0, 1, 2, 5, 40, 100):
        assert 1 / dcff_temperature(cur, 100) == pytest.approx(mmrazor_tau(cur, 100), rel=1e-12)
    assert dcff_temperature(0, 50, 2.0, 300.0, 0.1) == pytest.approx(2.0)
    assert dcff_temperature(50, 50, 2.0, 300.0, 0.1) == pytest.approx(300.0)
    curve = [dcff_temperature(n, 50, 2.0, 300.0, 0.1) for n in range(51)]
    assert all(a < b for a, b in zip(curve, curve[1:]))


def test_kl_scores_are_mmrazors_broadcast_formula():
    torch.manual_seed(0)
    filters = torch.randn(7, 27)
    p = filter_distribution(filters, 0.7)
    expected = torch.softmax(-torch.cdist(filters, filters) / 0.7, dim=1)
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(p.sum(1), torch.ones(7))
    # mmrazor: KL = mean over dim 2 of p[:, None, :] * (log(p + eps) - mean_dim1(log(p + eps))), summed over dim 1
    eps = 1e-7
    kl = p[:, None, :]
    log_p = kl * (kl + eps).log()
    log_q = kl * torch.mean((p + eps).log(), dim=1)
    mmrazor = torch.sum(torch.mean(log_p - log_q, dim=2), dim=1)
    torch.testing.assert_close(kl_scores(p), mmrazor)


# ------------------------------------------------------------------------------------------------- the op
def test_fuse_conv_computes_fused_filters_and_exports_them():
    torch.manual_seed(0)
    conv = FuseConv2d.convert_from(nn.Conv2d(6, 8, 3, padding=1))
    assert dynamic_op_problems(nn.Conv2d, FuseConv2d) == []  # a complete DynamicOp of nn.Conv2d
    out, cols = torch.tensor([1, 4, 6]), torch.tensor([0, 2, 3, 5])
    conv.set_out_index(out)
    conv.set_in_index(cols)
    block = torch.softmax(torch.randn(6, 6), dim=1)
    conv.set_fusion(2, 8, block)
    full = torch.eye(8)
    full[2:, 2:] = block
    x = torch.randn(2, 4, 5, 5)
    y = conv(x)
    fused = (full[out] @ conv.weight[:, cols].flatten(1)).view(3, 4, 3, 3)
    torch.testing.assert_close(y, F.conv2d(x, fused, full[out] @ conv.bias, padding=1), rtol=RTOL, atol=ATOL)
    y.sum().backward()
    assert conv.weight.grad[7].abs().sum() > 0  # a pruned filter learns through the fusion
    assert conv.weight.grad[0].abs().sum() == 0  # channel 0 is outside the fused block and not kept
    conv.eval()
    with torch.no_grad():
        before = conv(x)
        conv.set_fusion(2, 8, torch.eye(6))  # the eval cache must not serve the old fused weight
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight[out][:, cols], conv.bias[out], padding=1))
        conv.set_fusion(2, 8, block)
        static = conv.export()
    assert type(static) is nn.Conv2d and static.weight.shape == (3, 4, 3, 3)
    torch.testing.assert_close(static(x), before, rtol=RTOL, atol=ATOL)


def test_fuse_conv_depthwise_1d_and_refusals():
    torch.manual_seed(0)
    depthwise = FuseConv2d.convert_from(nn.Conv2d(5, 5, 3, groups=5, bias=False))
    index = torch.tensor([0, 3])
    depthwise.set_out_index(index)
    block = torch.softmax(torch.randn(5, 5), dim=1)
    depthwise.set_fusion(0, 5, block)
    x = torch.randn(1, 2, 6, 6)
    expected = F.conv2d(x, (block[index] @ depthwise.weight.flatten(1)).view(2, 1, 3, 3), groups=2)
    torch.testing.assert_close(depthwise(x), expected, rtol=RTOL, atol=ATOL)
    conv1d = FuseConv1d.convert_from(nn.Conv1d(4, 3, 2))
    conv1d.set_out_index(torch.tensor([2]))
    conv1d.set_fusion(0, 3, torch.full((3, 3), 1 / 3))
    z = torch.randn(2, 4, 7)
    torch.testing.assert_close(conv1d(z), F.conv1d(z, conv1d.weight.mean(0, keepdim=True),
                                                   conv1d.bias.mean(0, keepdim=True)), rtol=RTOL, atol=ATOL)
    grouped = FuseConv2d.convert_from(nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(ConfigError, match=r"grouped conv \(groups=2\)"):
        grouped.set_fusion(0, 4, torch.eye(4))
    with pytest.raises(ConfigError, match=r"must be a float tensor \[5, 5\], got \(4, 4\)"):
        depthwise.set_fusion(0, 5, torch.eye(4))
    with pytest.raises(ConfigError, match=r"range \[3, 9\)"):
        depthwise.set_fusion(3, 9, torch.eye(6))
    torch.testing.assert_close(depthwise(x), expected, rtol=RTOL, atol=ATOL)  # refusals changed nothing


# ------------------------------------------------------------------------------------------------ end to end
def test_dcff_end_to_end_steps_temperature_fusion_and_export():
    algorithm = build()
    assert (algorithm.step_freq, algorithm.prune_times) == (3, 4)  # prune_times = max_iters // step_freq
    model = algorithm.model
    assert all(type(model.get_submodule(n)) is FuseConv2d for n in ("c1", "c2", "dw"))
    assert {u.name for u in algorithm.mutator.mutable_units} == {U1, U2}
    _, pruned_at = train(algorithm, batches(12))
    assert pruned_at == [0, 3, 6, 9] and algorithm.done
    temperatures = [entry["temperature"] for entry in algorithm.history]
    assert temperatures[0] == pytest.approx(1.0) and all(a < b for a, b in zip(temperatures, temperatures[1:]))
    assert algorithm.mutator.current_choices == {U1: 0.5, U2: 0.6}
    # the kept filters are fusions of all filters (the last temperature, ~7600 with k=0.3, still mixes close ones)
    unit = {u.name: u for u in algorithm.mutator.mutable_units}[U1]
    kept = unit.current_index
    distribution = filter_distribution(model.c1.weight.detach().flatten(1), 1 / temperatures[-1])
    torch.testing.assert_close(model.c1.fusion, distribution)
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    small = algorithm.export().eval()
    assert (small.c1.out_channels, small.c2.out_channels, small.dw.out_channels, small.fc.in_features) == (6, 6, 6, 6)
    torch.testing.assert_close(small.c1.weight, (distribution[kept] @ model.c1.weight.flatten(1)).view(6, 3, 3, 3))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)


def test_first_step_fuses_at_temperature_one_and_ranks_by_kl():
    algorithm = build(step_freq=12, max_iters=13)  # one step, at iteration 0: t = 1
    train(algorithm, batches(1))
    model = algorithm.model
    unit = {u.name: u for u in algorithm.mutator.mutable_units}[U1]
    distribution = filter_distribution(model.c1.weight.detach().flatten(1), 1.0)
    expected = kl_scores(distribution).topk(6).indices.sort().values
    assert torch.equal(unit.current_index, expected)
    plain = model.c1.weight[expected]
    fused = (distribution[expected] @ model.c1.weight.flatten(1)).view_as(plain)
    assert (fused - plain).abs().max() > 1e-3  # at t = 1 a fused filter is a real mixture
    small = algorithm.export()
    torch.testing.assert_close(small.c1.weight, fused)


def test_resume_mid_run_reproduces_the_uninterrupted_run():
    data = batches(12, seed=3)
    whole = build(seed=1)
    train(whole, data)

    first = build(seed=1)
    optimizer, _ = train(first, data[:7])  # 3 steps taken (0, 3, 6), in the middle of the schedule
    buffer = io.BytesIO()
    torch.save({"model": first.model.state_dict(), "optimizer": optimizer.state_dict(),
                "algorithm": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    second = build(seed=2)  # other initial weights: everything must come from the checkpoint
    second.model.load_state_dict(saved["model"])
    second.load_state_dict(saved["algorithm"])
    assert second.counter == 7 and second.steps_done == 3 and second.history == first.history
    resumed = torch.optim.SGD(second.model.parameters(), lr=0.05, momentum=0.9)
    resumed.load_state_dict(saved["optimizer"])
    train(second, data[7:], resumed)

    assert second.history == whole.history
    kept = {name: None if index is None else index.tolist() for name, index in whole.mutator.selection_state().items()}
    assert {name: None if index is None else index.tolist()
            for name, index in second.mutator.selection_state().items()} == kept
    assert len(kept[U1]) == 6 and len(kept[U2]) == 6
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(second.export().eval()(x), whole.export().eval()(x), rtol=0, atol=0)


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    join_two_rank_gloo(rank, port)
    try:
        algorithm = build(seed=1)  # one seed on every rank: the same weights, so the same ranking
        model = algorithm.model.train()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for images, labels in batches(8, seed=20 + rank):  # different data per rank; steps at 0, 3, 6
            loss = F.cross_entropy(ddp(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            algorithm.step()
        torch.save({"selection": {n: i for n, i in algorithm.mutator.selection_state().items() if i is not None},
                    "weights": {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
                    "history": algorithm.history}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_two_gloo_ranks_on_different_data_stay_identical(tmp_path):
    rank0, rank1 = run_two_ranks(_rank_worker, tmp_path, 180)
    assert rank0["history"] == rank1["history"] and len(rank0["history"]) == 3
    assert rank0["selection"].keys() == rank1["selection"].keys() and rank0["selection"]
    for name, index in rank0["selection"].items():
        assert torch.equal(index, rank1["selection"][name]), name
    for name, tensor in rank0["weights"].items():
        if "running" not in name and "num_batches" not in name:  # DDP broadcasts buffers before a forward only
            torch.testing.assert_close(tensor, rank1["weights"][name], rtol=1e-5, atol=1e-6, msg=name)
    # one rank alone on its own data ends elsewhere: the gradient reduction did something
    alone = build(seed=1)
    train(alone, batches(8, seed=20))
    moved = alone.model.c1.weight.detach()
    assert not torch.allclose(moved, rank0["weights"]["c1.weight"], rtol=1e-5, atol=1e-6)


def test_checkpoint_of_another_schedule_is_refused_and_changes_nothing():
    first = build()
    train(first, batches(4))
    state = first.state_dict()
    other = build(max_iters=15)  # step_freq 3 -> prune_times 5: a different schedule
    with pytest.raises(ConfigError, match=r"max_iters=12"):
        other.load_state_dict(state)
    bad = dict(state, fusion={U1: {"c1": torch.eye(3)}})
    fresh = build()
    with pytest.raises(ConfigError, match=r"layer c1: a fusion block must be a float tensor \[12, 12\]"):
        fresh.load_state_dict(bad)
    assert fresh.counter == 0 and fresh.mutator.fusion_state() == {}


# --------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("overrides, key", [
    (dict(max_iters=None), "max_iters"),
    (dict(max_iters=0), "max_iters"),
    (dict(step_freq=-1), "step_freq"),
    (dict(step_freq=2, prune_times=3), "exactly one of step_freq and prune_times"),
    (dict(step_freq=0, prune_times=0), "exactly one of step_freq and prune_times"),
    (dict(step_freq=1, by_epoch=True), "iters_per_epoch"),
    (dict(temperature_start=0.0), "temperature_start"),
    (dict(temperature_end=0.5), "temperature_end"),
    (dict(temperature_k=float("nan")), "temperature_k"),
])
def test_bad_config_values_name_the_key_and_leave_the_model_alone(overrides, key):
    model = ChainNet()
    args = dict(target_pruning_ratio=0.5, step_freq=3, max_iters=12)
    args.update(overrides)
    with pytest.raises(ConfigError, match=f"DCFF: .*{key}") as error:
        DCFF(model, dict(type="DCFFChannelMutator", parse_cfg=PARSE), **args)
    assert len(str(error.value).splitlines()) == 1
    assert type(model.c1) is nn.Conv2d  # nothing was converted


def test_other_mutators_units_and_compact_training_are_refused():
    with pytest.raises(ConfigError, match="DCFF: the mutator must be a DCFFChannelMutator"):
        DCFF(ChainNet(), dict(type="ChannelMutator", parse_cfg=PARSE), step_freq=3, max_iters=12)
    with pytest.raises(ConfigError, match="channel_unit_cfg type must be DCFFChannelUnit"):
        DCFFChannelMutator(dict(type="L1MutableChannelUnit"), PARSE)
    with pytest.raises(ConfigError, match="candidate_choices must be a list of numbers"):
        DCFFChannelUnit(8, candidate_choices="all")
    algorithm = build()
    with pytest.raises(ConfigError, match="compact training is not available"):
        algorithm.start_compact_training(torch.optim.SGD(algorithm.model.parameters(), lr=0.1))


# ------------------------------------------------------------------------------------------------ mmrazor's API
def test_mmrazors_signature_and_config_names():
    torch.manual_seed(0)
    # DCFF(architecture, mutator_cfg, data_preprocessor, target_pruning_ratio, step_freq, ...), by epoch: mmrazor's
    # test checks step_freq in iterations and prune_times = max_iters // step_freq after construction
    algorithm = MODELS.build(dict(
        type="DCFF", architecture=dict(type="MMClsLikeChain"),
        mutator_cfg=dict(type="DCFFChannelMutator", channel_unit_cfg=dict(
            type="DCFFChannelUnit", default_args=dict(choice_mode="number")), parse_cfg=PARSE),
        target_pruning_ratio={U1: 6}, step_freq=2, linear_schedule=True, by_epoch=True, iters_per_epoch=10,
        max_iters=100))
    assert (algorithm.step_freq, algorithm.prune_times) == (20, 5)
    assert [algorithm.choices_at(t)[U1] for t in range(1, 6)] == [10, 9, 8, 7, 6]  # 12 -> 6 in 5 linear steps
    positional = DCFF(ChainNet(), dict(type="DCFFChannelMutator", parse_cfg=PARSE), None, {U2: 0.5}, 0, 4,
                      max_iters=20)
    assert (positional.step_freq, positional.prune_times, positional.linear_schedule) == (5, 4, False)
    positional.mutator.calc_information(0.5)  # mmrazor's mutator step, here at full width: nothing fused
    assert positional.mutator.fusion_state() == {}


@MODELS.register_module(force=True)
class MMClsLikeChain(ChainNet):
    """ChainNet, buildable by name from a config."""


def test_save_deploy_writes_the_fused_subnet_and_mmrazors_fix_subnet(tmp_path):
    algorithm = build()
    train(algorithm, batches(5))
    paths = algorithm.save_deploy(str(tmp_path))
    fix_subnet = json.loads(Path(paths["fix_subnet"]).read_text())
    assert fix_subnet["type"] == "DCFFChannelMutator"
    assert fix_subnet["channel_unit_cfg"]["units"][U1] == {
        "init_args": {"num_channels": 12, "choice_mode": "ratio", "divisor": 1, "min_value": 1, "min_ratio": 0.9},
        "choice": 0.5}
    loaded = load_pruned(ChainNet(), paths["structure"], paths["weights"]).eval()
    algorithm.model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), algorithm.model(x), rtol=RTOL, atol=ATOL)


@pytest.mark.slow  # ~8 s: a ResNet-18's distances and fused filters on one CPU thread
def test_published_dcff_resnet18_config_runs_end_to_end():
    """mmrazor's DCFF ResNet-18 fix_subnet choices as the target, its mutator config, a few iterations at 32 px."""
    from compat.models import MMClsResNet

    data = json.loads((FIXTURES / "dcff_resnet18_fix_subnet.json").read_text())
    mutator = {"type": data["type"], "channel_unit_cfg": data["channel_unit_cfg"],
               "parse_cfg": {**data["parse_cfg"], "demo_input": (1, 3, 32, 32)}}
    target = {name: unit["choice"] for name, unit in data["units"].items()}
    torch.manual_seed(0)
    algorithm = DCFF(MMClsResNet(18, num_classes=10), mutator, target_pruning_ratio=target, step_freq=1,
                     by_epoch=True, iters_per_epoch=1, max_iters=2, strict=True)
    assert (algorithm.step_freq, algorithm.prune_times) == (1, 2)
    generator = torch.Generator().manual_seed(0)
    data_batches = [(torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 10, (2,), generator=generator))
                    for _ in range(2)]
    _, pruned_at = train(algorithm, data_batches)
    assert pruned_at == [0, 1]
    assert [entry["temperature"] for entry in algorithm.history] == pytest.approx([1.0, dcff_temperature(1, 2)])
    small = algorithm.export().eval()
    backbone = small.backbone
    # the fixture's widths: 0.640625 of 64 = 41, 0.59375 of 128 = 76, 0.69921875 of 512 = 358
    assert (backbone.layer1[0].conv1.out_channels, backbone.layer2[0].conv2.out_channels,
            backbone.layer2[0].downsample[0].out_channels, backbone.layer4[1].conv1.out_channels) == (41, 76, 76, 358)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), algorithm.model.eval()(x), rtol=1e-4, atol=1e-4)


def test_a_unit_prepared_on_its_own_makes_its_convs_fuse_convs():
    """mmrazor's unit API: ``prepare_for_pruning`` replaces the unit's convs by FuseConvs (mmrazor's mapping), and
    setting a choice ranks by the KL criterion at the unit's tau."""
    from pyprune.tracing import trace_channel_units

    torch.manual_seed(0)
    model = ChainNet()
    spec = next(s for s in trace_channel_units(model, torch.randn(1, 3, 8, 8)) if s.name == U1)
    unit = DCFFChannelUnit.from_spec(spec)
    unit.prepare_for_pruning(model)
    assert type(model.c1) is FuseConv2d and type(model.c2) is FuseConv2d  # producer and consumer
    unit.set_tau(0.5)
    unit.current_choice = 0.25
    scores = kl_scores(filter_distribution(model.c1.weight.flatten(1), 0.5))
    assert unit.current_index.tolist() == scores.topk(3).indices.sort().values.tolist()
    unit.fuse_filters()
    assert set(unit.fusion_state()) == {"c1"} and model.c1.active_out_channels == 3
    with pytest.raises(ConfigError, match="tau must be a finite number > 0"):
        unit.set_tau(0.0)
