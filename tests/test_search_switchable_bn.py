"""The subnet search and switchable BatchNorms: a slimmable supernet's per-width statistics are its own.

One-shot units share one set of BN statistics across widths, so the search recalibrates a subnet before scoring
it; slimmable units with switchable BNs keep a set per width, which a recalibration must neither need nor touch.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from pyprune.algorithms import SlimmableNetwork
from pyprune.budget.search import BatchNormCalibrator, needs_bn_recalibration
from pyprune.mutators import ChannelMutator
from pyprune.ops import SwitchableBatchNorm2d

PARSE = dict(type="ChannelAnalyzer", demo_input=(1, 3, 8, 8), tracer_type="BackwardTracer")


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def slimmable():
    units = {"0_(0, 16)_16": {"init_args": {"num_channels": 16, "candidate_choices": [4, 8, 16]}},
             "3_(0, 8)_8": {"init_args": {"num_channels": 8, "candidate_choices": [2, 4, 8]}}}
    cfg = dict(type="SlimmableChannelMutator", parse_cfg=dict(PARSE),
               channel_unit_cfg=dict(type="SlimmableChannelUnit", units=copy.deepcopy(units)))
    return SlimmableNetwork(net(), cfg)


def test_switchable_bns_need_no_recalibration_but_shared_one_shot_bns_do():
    algorithm = slimmable()
    assert any(isinstance(m, SwitchableBatchNorm2d) for m in algorithm.model.modules())
    assert not needs_bn_recalibration(algorithm.mutator)

    one_shot = ChannelMutator(dict(type="OneShotMutableChannelUnit",
                                   default_args=dict(candidate_choices=[0.5, 1.0], choice_mode="ratio")),
                              parse_cfg=dict(PARSE))
    one_shot.prepare_from_supernet(net())
    assert needs_bn_recalibration(one_shot)


def test_the_calibrator_leaves_per_width_statistics_alone():
    algorithm = slimmable()
    model = algorithm.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    algorithm.train_step(x, y, optimizer, F.cross_entropy)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    calibrator = BatchNormCalibrator(model, [(torch.randn(8, 3, 8, 8) * 3 + 1, None)], batches=1)
    assert calibrator.norms == []  # every BN of this model switches per width
    calibrator.calibrate()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
