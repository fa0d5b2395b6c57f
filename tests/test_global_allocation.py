"""Global allocation with cost-normalised importance and a floor per unit: a residual network pruned to 50 % FLOPs
keeps every unit at or above its floor, meets the target on the exported model within one allocation step, keeps
exactly the highest-Taylor channels of each unit, and the export computes what the dynamic model computes."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from pyprune.budget import prune_to_budget
from pyprune.mutators import ChannelMutator, count_flops

SIZE = 16
FLOOR = 0.25


def prepared(unit_type):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    mutator = ChannelMutator(unit_type, parse_cfg=dict(demo_input=(1, 3, SIZE, SIZE)))
    mutator.prepare_from_supernet(model)
    return model, mutator


def accumulate_taylor(model, mutator, batches=2):
    generator = torch.Generator().manual_seed(1)
    for _ in range(batches):
        x = torch.randn(4, 3, SIZE, SIZE, generator=generator)
        y = torch.randint(0, 5, (4,), generator=generator)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for unit in mutator.mutable_units:
            unit.update_importance()
    model.zero_grad()


@pytest.mark.parametrize("unit_type", ["L1MutableChannelUnit", "TaylorMutableChannelUnit"])
def test_global_with_floor_meets_the_target_and_keeps_every_unit_above_its_floor(unit_type):
    model, mutator = prepared(unit_type)
    if unit_type == "TaylorMutableChannelUnit":
        accumulate_taylor(model, mutator)
    x = torch.randn(2, 3, SIZE, SIZE)
    full_flops = count_flops(model, (x[:1],))
    result = prune_to_budget(model, mutator, flops=0.5, allocation="global", floor=FLOOR)
    for unit in mutator.mutable_units:
        assert unit.active_channels >= math.ceil(FLOOR * unit.num_channels) - unit.groups + 1, unit.name
    model.eval()
    with torch.no_grad():
        dynamic = model(x)
        small = mutator.export(model).eval()
        exported = small(x)
    torch.testing.assert_close(exported, dynamic, rtol=1e-4, atol=1e-5)  # float32, summation order may differ
    flops = count_flops(small, (x[:1],))
    assert flops <= 0.5 * full_flops
    assert 0.5 * full_flops - flops < result.granularity["flops"] + 1  # within one step of the allocation
    # global allocation is not uniform: the units end at different kept fractions
    fractions = {round(u.active_channels / u.num_channels, 3) for u in mutator.mutable_units}
    assert len(fractions) > 2


def test_global_taylor_keeps_each_units_highest_taylor_channels():
    model, mutator = prepared("TaylorMutableChannelUnit")
    accumulate_taylor(model, mutator)
    scores = {u.name: u.channel_importance().clone() for u in mutator.mutable_units}
    prune_to_budget(model, mutator, flops=0.5, allocation="global", floor=FLOOR)
    checked = 0
    for unit in mutator.mutable_units:
        if unit.groups != 1 or unit.active_channels == unit.num_channels:
            continue
        mask = torch.zeros(unit.num_channels, dtype=torch.bool)
        mask[unit.current_index.cpu()] = True
        kept, dropped = scores[unit.name][mask], scores[unit.name][~mask]
        assert kept.min() >= dropped.max(), unit.name
        checked += 1
    assert checked > 0
