"""ActivationMutableChannelUnit: calibration scores, ranking, the score file, compact mode and an export."""
import re

import pytest
import torch
from torch import nn

from models import TinyTransformer, TokenNet, in_ref, out_ref
from pyprune import ChannelMutator
from pyprune.errors import ConfigError
from pyprune.ops import compact_training
from pyprune.tracing import UnitSpec
from pyprune.units import UNITS, ActivationMutableChannelUnit, calibrate, load_scores, save_scores


def conv_bn_net(metric="l1"):
    """conv(3->6) -> BN -> ReLU -> conv(6->2); one unit of 6 channels, output-related conv and BN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5), model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.2, 3.0)
    spec = UnitSpec(6, [out_ref("0", 0, 6), out_ref("1", 0, 6)], [in_ref("1", 0, 6), in_ref("3", 0, 6)])
    unit = ActivationMutableChannelUnit.from_spec(spec, choice_mode="number", min_ratio=0.0, metric=metric)
    unit.prepare_for_pruning(model)
    return model, unit


def inputs(count, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(2, 3, 4, 4, generator=generator) for _ in range(count)]


def hand_score(model, xs, metric):
    """Per layer: mean over N, H, W and batches of |y| (or y ** 2), scaled to mean 1; summed over conv and BN."""
    with torch.no_grad():
        conv_out = torch.cat([model[0](x) for x in xs])
        bn_out = model[1].eval()(conv_out)
    total = 0
    for y in (conv_out, bn_out):
        stat = (y.abs() if metric == "l1" else y.square()).mean((0, 2, 3))
        total = total + stat / stat.mean()
    return total


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_scores_equal_a_hand_computation(metric):
    model, unit = conv_bn_net(metric)
    assert unit.config_template(with_init_args=True)["init_args"]["metric"] == metric
    model.train()
    assert unit.channel_importance() is None  # nothing to rank by yet: the first channels are kept
    assert calibrate([unit], model, inputs(4, seed=1), num_batches=3) == [unit.name]
    assert model.training and model[1].training  # the modes came back
    torch.testing.assert_close(unit.scores, hand_score(model, inputs(3, seed=1), metric).float())


def test_ranking_keeps_the_highest_scores_and_pruned_channels_keep_theirs():
    model, unit = conv_bn_net()
    calibrate([unit], model, inputs(2, seed=1))
    first = unit.scores
    unit.current_choice = 3
    kept = first.topk(3).indices.sort().values
    assert unit.current_index.tolist() == kept.tolist()
    # Calibrating at the pruned width: only the 3 kept channels ran, so only they get new scores (mean 1 over them).
    xs = inputs(2, seed=7, scale=3.0)
    calibrate([unit], model, xs)
    pruned = torch.ones(6, dtype=torch.bool)
    pruned[kept] = False
    torch.testing.assert_close(unit.scores[pruned], first[pruned])
    with torch.no_grad():
        conv_out = torch.cat([model[0](x) for x in xs])  # active width: [N, 3, H, W]
        bn_out = model[1].eval()(conv_out)
    expected = sum(s / s.mean() for s in (y.abs().mean((0, 2, 3)) for y in (conv_out, bn_out)))
    torch.testing.assert_close(unit.scores[kept], expected)
    assert unit.num_calibrations == 2


def test_calibrate_refuses_short_data_and_changes_nothing():
    model, unit = conv_bn_net()
    calibrate([unit], model, inputs(1, seed=1))
    before = unit.scores
    with pytest.raises(ConfigError, match="asked for 5 batches, the iterable gave 2"):
        calibrate([unit], model, inputs(2, seed=3), num_batches=5)
    torch.testing.assert_close(unit.scores, before)
    assert not model[0]._forward_hooks  # hooks removed
    with pytest.raises(ConfigError, match="metric must be one of"):
        ActivationMutableChannelUnit(4, metric="mean")


def test_score_file_round_trip_and_refusals(tmp_path):
    model, unit = conv_bn_net()
    with pytest.raises(ConfigError, match="no scores yet"):
        save_scores([unit], tmp_path / "none.pt")
    calibrate([unit], model, inputs(2, seed=1))
    path = tmp_path / "scores.pt"
    save_scores([unit], path)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {unit.name} and saved[unit.name].dtype == torch.float32

    fresh_model, fresh = conv_bn_net()
    load_scores([fresh], path)
    torch.testing.assert_close(fresh.scores, unit.scores)
    fresh.current_choice = 2
    unit.current_choice = 2
    assert fresh.current_index.tolist() == unit.current_index.tolist()

    # Wrong width: refused, naming the unit and both widths; the scores stay as they were.
    torch.save({unit.name: torch.rand(5)}, tmp_path / "narrow.pt")
    with pytest.raises(ConfigError, match=rf"unit {re.escape(unit.name)} has 6 channels.*shape \(5,\)"):
        load_scores([fresh], tmp_path / "narrow.pt")
    torch.testing.assert_close(fresh.scores, unit.scores)
    torch.save({"other": torch.rand(6)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=rf"missing \[{re.escape(repr(unit.name))}\], unknown \['other'\]"):
        load_scores([fresh], tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="no score file"):
        load_scores([fresh], tmp_path / "absent.pt")
    torch.testing.assert_close(fresh.scores, unit.scores)


def prepared_transformer(model_type=TinyTransformer, size=8):
    torch.manual_seed(0)
    model = model_type()
    mutator = ChannelMutator(channel_unit_cfg=dict(type="ActivationMutableChannelUnit",
                                                   default_args=dict(choice_mode="ratio")),
                             parse_cfg=dict(demo_input=(1, 3, size, size)))
    mutator.prepare_from_supernet(model)
    return model, mutator


# TinyTransformer: conv, channels-first LayerNorm (a served layer), LayerNorm, attention, MLP; TokenNet also has
# per-channel parameters (class token, position embedding, layer scale) in a unit: they have no output to measure.
@pytest.mark.parametrize("model_type, size", [(TinyTransformer, 8), (TokenNet, 4)])
def test_built_by_name_prunes_by_activation_and_exports(model_type, size):
    assert UNITS["ActivationMutableChannelUnit"] is ActivationMutableChannelUnit
    model, mutator = prepared_transformer(model_type, size)
    units = mutator.mutable_units
    assert units and all(isinstance(u, ActivationMutableChannelUnit) for u in units)
    calib = [(torch.randn(4, 3, size, size), None) for _ in range(3)]
    assert sorted(calibrate(mutator, model, calib, num_batches=2)) == sorted(u.name for u in units)
    mutator.set_global_ratio(0.5)
    for unit in units:
        kept = unit.scores.topk(unit.active_channels).indices.sort().values
        assert unit.active_channels < unit.num_channels
        assert unit.current_index.cpu().tolist() == kept.tolist()
    x = torch.randn(2, 3, size, size)
    exported = mutator.export(model).eval()
    model.eval()
    with torch.no_grad():
        dynamic, static = model(x), exported(x)
    torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in model.parameters())


def test_compact_mode_records_what_gather_mode_records():
    model, mutator = prepared_transformer()
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    calibrate(mutator, model, calib)
    mutator.set_global_ratio(0.5)
    calibrate(mutator, model, calib)
    gather = {u.name: u.scores for u in mutator.mutable_units}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with compact_training(model, optimizer):
        calibrate(mutator, model, calib)
    for unit in mutator.mutable_units:
        torch.testing.assert_close(unit.scores, gather[unit.name])


def test_embedding_outputs_are_measured_on_their_last_dim():
    torch.manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(10, 8), "fc": nn.Linear(8, 3)})
    spec = UnitSpec(8, [out_ref("embed", 0, 8)], [in_ref("fc", 0, 8)])
    unit = ActivationMutableChannelUnit.from_spec(spec, choice_mode="number", min_ratio=0.0, metric="l2")
    unit.prepare_for_pruning(model)
    ids = [torch.randint(0, 10, (2, 5)) for _ in range(2)]
    calibrate([unit], model, ids, forward=lambda m, batch: m["fc"](m["embed"](batch)))
    stat = model["embed"].weight.detach()[torch.cat(ids).flatten()].square().mean(0)
    torch.testing.assert_close(unit.scores, stat / stat.mean())



class TwoRankSum:
    """Stands in for ``torch.distributed`` in a world of two ranks, in one process: ``all_reduce`` adds what the
    other rank handed over, call by call (``given``), and records what this rank hands over (``taken``)."""

    def __init__(self, given=None):
        self.given, self.taken = list(given or []), []

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def all_reduce(self, tensor):
        self.taken.append(tensor.clone())
        if self.given:
            tensor += self.given.pop(0)


def test_ranks_score_all_ranks_batches_together(monkeypatch):
    import pyprune.units.calibration as calibration
    other_rank = TwoRankSum()
    monkeypatch.setattr(calibration, "dist", other_rank)
    model, unit = conv_bn_net()
    calibrate([unit], model, inputs(2, seed=11))
    this_rank = TwoRankSum(given=other_rank.taken)
    monkeypatch.setattr(calibration, "dist", this_rank)
    model, unit = conv_bn_net()  # seeded: the same weights as the other rank
    calibrate([unit], model, inputs(2, seed=10))
    assert not this_rank.given and len(this_rank.taken) == 4  # sums and counts of conv and BN, the same order
    monkeypatch.undo()
    single_model, single = conv_bn_net()
    calibrate([single], single_model, inputs(2, seed=10) + inputs(2, seed=11))
    torch.testing.assert_close(unit.scores, single.scores)
