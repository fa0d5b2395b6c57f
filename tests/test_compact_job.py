"""Compact training in the algorithm and the main job: ItePruneAlgorithm.start_compact_training, `pyprune prune`.

With plain SGD (no momentum, no weight decay) gather mode never moves a pruned channel either, so an iterative run
in compact mode must equal the gather-mode run exactly, through every pruning step (Taylor importance is read with
full-size gradients inside the algorithm's pause; L1 ranks the full-size weights).
"""
import json

import pytest
import torch
import torch.nn.functional as F

from pyprune.app import cli
from pyprune.algorithms import ItePruneAlgorithm
from pyprune.errors import ConfigError

from helpers import batches, logits
from helpers import prepared_zoo_net as prepared


@pytest.mark.parametrize("unit_type", ["TaylorMutableChannelUnit", "L1MutableChannelUnit"])
def test_iterative_pruning_in_compact_mode_equals_gather_mode(unit_type):
    results = []
    for compact in (False, True):
        model, mutator = prepared(unit_type)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        algorithm = ItePruneAlgorithm(model, mutator, 0.5, step_freq=2, prune_times=2, optimizer=optimizer,
                                      compact=compact)
        assert algorithm.compact_training == compact
        changed = []
        for x, y in batches(6):
            model.train()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            algorithm.after_backward()
            optimizer.step()
            changed.append(algorithm.step())
            if compact and changed[-1]:  # the new subnet is compact right after the step
                active = next(u for u in mutator.mutable_units if u.name.startswith("stem")).active_channels
                assert model.stem.weight.shape[0] == active
        assert changed == [True, False, True, False, False, False]
        results.append((logits(model, batches(1, seed=7)[0][0]), [u.current_index for u in mutator.mutable_units],
                        algorithm.state_dict()))
        if compact:
            with pytest.raises(ConfigError, match="already on"):
                algorithm.start_compact_training(optimizer)
            algorithm.stop_compact_training()
            assert not algorithm.compact_training and model.stem.weight.shape == (16, 3, 3, 3)
    (gather_out, gather_index, gather_state), (compact_out, compact_index, compact_state) = results
    torch.testing.assert_close(compact_out, gather_out, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(compact_index, gather_index))
    for name, importance in gather_state["importance"].items():
        if importance is not None:
            other = compact_state["importance"][name]
            assert other["num_updates"] == importance["num_updates"]
            if importance["importance"] is not None:
                torch.testing.assert_close(other["importance"], importance["importance"], rtol=1e-6, atol=1e-6)


def test_algorithm_checkpoint_restores_into_compact_mode():
    model, mutator = prepared()
    algorithm = ItePruneAlgorithm(model, mutator, 0.5, step_freq=1, prune_times=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    algorithm.start_compact_training(optimizer)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert algorithm.step()
    checkpoint = model.state_dict(), optimizer.state_dict(), algorithm.state_dict()

    fresh, fresh_mutator = prepared()
    fresh_algorithm = ItePruneAlgorithm(fresh, fresh_mutator, 0.5, step_freq=1, prune_times=1)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    fresh_algorithm.start_compact_training(fresh_optimizer)
    fresh.load_state_dict(checkpoint[0])
    fresh_optimizer.load_state_dict(checkpoint[1])
    fresh_algorithm.load_state_dict(checkpoint[2])
    assert fresh.stem.weight.shape == model.stem.weight.shape == (8, 3, 3, 3)
    assert torch.equal(fresh_optimizer.state[fresh.stem.weight]["momentum_buffer"],
                       optimizer.state[model.stem.weight]["momentum_buffer"])
    torch.testing.assert_close(logits(fresh, x), logits(model, x), rtol=0, atol=0)


def test_prune_job_trains_compact_by_default_and_says_so(tmp_path, capsys):
    out = tmp_path / "compact"
    assert cli.main(["prune", "--quick", "--no-progress", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compact_training"] is True and "compact training on" in capsys.readouterr().out
    assert summary["params_after"] < summary["params_before"] and summary["reload_max_abs_diff"] <= 1e-4
    assert cli.main(["prune", "--quick", "--no-progress", "--no-compact", "--max-iterations", "1", "--output-dir",
                     str(tmp_path / "gather")]) == 0
    assert "compact training off (--no-compact)" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "gather" / "checkpoint.pt", weights_only=True)
    assert checkpoint["position"] == 1


class _SilentBar:
    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def test_model_bench_compact_backend_rows():
    from pyprune.app.bench import model_bench as bench
    cfg = bench.ModelBenchConfig(device=torch.device("cpu"), models=("tiny",), batch_sizes=(2,), ratios=(0.5,),
                                 image_size=16, warmup=1, reps=3, backends=("pyprune-compact", "dense"),
                                 switch_subnets=2, switch_passes=1, clock="thread")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    with pytest.raises(ValueError, match="--threads 1"):
        bench.check_clock(cfg)
    torch.set_num_threads(1)
    try:
        rows = bench.run(cfg, lambda total, desc: (_SilentBar(), lambda n: None))
    finally:
        torch.set_num_threads(threads)
    cells = {(r["backend"], r["workload"]) for r in rows if r["status"] == "ok"}
    assert {("pyprune-compact", w) for w in ("eval", "train", "enter+exit", "switch")} <= cells
    train = next(r for r in rows if r["backend"] == "pyprune-compact" and r["workload"] == "train")
    assert len(train["times_ms"]) == 3 and train["vs_dense"] > 0
    target = next(t for t in bench.evaluate_targets(rows) if "compact train" in t["target"])
    assert target["result"] in ("met", "MISSED") and "tiny b2 r0.5" in target["numbers"]
