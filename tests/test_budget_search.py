"""Subnet search under a budget: candidates meet the constraint, the best is applied, BatchNorm statistics are
recalibrated per candidate for one-shot supernets and restored otherwise, the chosen structure's JSON reloads."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyprune.budget import BudgetError, CostModel, search_subnet
from pyprune.mutators import ChannelMutator, count_flops


class SuperNet(nn.Module):
    """Four conv-bn-relu layers pooled into a linear head (four units). ``[N, 3, 12, 12] -> [N, 4]``."""

    def __init__(self):
        super().__init__()
        widths = (3, 16, 32, 32, 48)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=1 + (i == 1), padding=1, bias=False)
                                   for i, (a, b) in enumerate(zip(widths, widths[1:])))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in widths[1:])
        self.head = nn.Linear(widths[-1], 4)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x)))
        return self.head(x.mean((2, 3)))


# tiny models gain nothing from a second thread, and lose much on a shared, oversubscribed CPU
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


SHAPE = (1, 3, 12, 12)


def supernet(unit="OneShotMutableChannelUnit"):
    model = SuperNet()
    args = dict(candidate_choices=[0.25, 0.5, 0.75, 1.0]) if unit == "OneShotMutableChannelUnit" else {}
    mutator = ChannelMutator(dict(type=unit, default_args=args), parse_cfg=dict(demo_input=SHAPE))
    mutator.prepare_from_supernet(model)
    return model, mutator


def loader(seed=0, batches=2):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(8 * batches, 3, 12, 12, generator=generator) * 2 + 1
    return DataLoader(TensorDataset(images, torch.randint(0, 4, (8 * batches,), generator=generator)), batch_size=8)


def width_score(model):
    """Prefers wide subnets: the number of channels the head sees plus the first conv's (a known optimum)."""
    return float(model.head.active_in_channels + 0.01 * model.convs[0].active_out_channels)


def test_search_finds_a_subnet_under_the_budget_and_its_json_reloads(tmp_path):
    model, mutator = supernet()
    result = search_subnet(model, mutator, loader(), flops=0.5, score_fn=width_score, population=6, generations=2,
                           calib_batches=1, progress=False)
    full = CostModel.from_model(model, mutator).full()
    assert all(c.cost.flops <= 0.5 * full.flops for c in result.candidates)
    assert len(result.candidates) > 6 and result.best.score == max(c.score for c in result.candidates)
    assert {u.name: u.active_channels for u in mutator.mutable_units} == result.best.counts
    x = torch.randn(SHAPE)
    assert count_flops(mutator.export(model), (x,)) == result.best.cost.flops <= 0.5 * full.flops
    assert "rank" in result.table() and f"{result.best.score:.4f}" in result.table()
    path = tmp_path / "structure.json"
    result.save_json(str(path))
    fresh = SuperNet()
    reloaded = ChannelMutator.from_config(json.loads(path.read_text()))
    reloaded.prepare_from_supernet(fresh)
    assert {u.name: u.active_channels for u in reloaded.mutable_units} == result.best.counts
    assert count_flops(reloaded.export(fresh), (x,)) == result.best.cost.flops


def test_one_shot_candidates_get_their_own_batchnorm_statistics():
    """Every candidate is scored after recalibration; afterwards the statistics are the original ones except the
    best subnet's active channels, recalibrated for it."""
    model, mutator = supernet()
    before = model.bns[1].running_mean.clone()
    seen_means = []

    def score(m):
        seen_means.append(m.bns[1].running_mean.clone())
        return width_score(m)
    result = search_subnet(model, mutator, loader(), flops=0.6, score_fn=score, population=4, generations=1,
                           calib_loader=loader(seed=1), calib_batches=2, progress=False)
    assert all(not torch.equal(mean, before) for mean in seen_means)   # recalibrated before scoring
    kept = result.best.counts["convs.1_(0, 32)_32"]
    assert kept < 32
    assert torch.equal(model.bns[1].running_mean[kept:], before[kept:])   # inactive channels restored
    assert not torch.equal(model.bns[1].running_mean[:kept], before[:kept])


def test_importance_units_are_scored_without_recalibration_by_default():
    model, mutator = supernet("L1MutableChannelUnit")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    result = search_subnet(model, mutator, loader(), params=0.5, population=3, generations=1, progress=False)
    assert 0.0 <= result.best.score <= 1.0   # top-1 accuracy on the loader
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_an_unreachable_search_budget_is_refused_and_nothing_changes():
    model, mutator = supernet()
    mutator.set_choices({u.name: u.max_choice for u in mutator.mutable_units})
    before = dict(mutator.current_choices)
    with pytest.raises(BudgetError, match="cannot be met by any candidate"):
        search_subnet(model, mutator, loader(), flops=0.01, score_fn=width_score, progress=False)
    with pytest.raises(BudgetError, match="flops or params"):
        search_subnet(model, mutator, loader(), score_fn=width_score, progress=False)
    assert mutator.current_choices == before
