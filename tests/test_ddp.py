"""Distributed pruning: two gloo processes on the loopback interface agree on every channel and every weight.

``test_ddp_ranks_prune_identically`` trains SmallNet (tests/models.py) under DistributedDataParallel with
Taylor units on *different* data per rank;
``test_ranks_follow_rank0_selection`` makes the ranks' L1 rankings differ on purpose (no DDP) and checks that the
algorithm's broadcast leaves rank 1 with rank 0's channels; ``test_group_fisher_ranks_sum_their_fisher_...`` runs a
GroupFisher step under DDP on different data per rank. ``test_torchrun_main_job`` runs ``pyprune prune --quick``
under torchrun.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import free_port, join_two_rank_gloo, run_two_ranks
from models import SmallNet

pytestmark = pytest.mark.ddp
TIMEOUT_S = 120
RESIDUAL = "conv0_(0, 8)_8"  # conv0 / bn0 / conv1 / bn1 around the residual add
REPO = Path(__file__).resolve().parents[1]


def _prepared(unit_type):
    from pyprune.mutators import ChannelMutator
    torch.manual_seed(0)
    model = SmallNet()
    mutator = ChannelMutator(channel_unit_cfg=unit_type, parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    mutator.prepare_from_supernet(model)
    return model, mutator


def _worker(rank: int, port: int, out_dir: str) -> None:
    from pyprune.algorithms import ItePruneAlgorithm
    from pyprune.app.training.distributed import broadcast_buffers
    join_two_rank_gloo(rank, port)
    try:
        # 1. DDP training with gradient importance, each rank on its own data.
        model, mutator = _prepared("TaylorMutableChannelUnit")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        algorithm = ItePruneAlgorithm(ddp, mutator, 0.5, step_freq=2, prune_times=3)
        assert algorithm.model is model
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        ddp.train()  # BatchNorm statistics are updated, from each rank's own batches
        generator = torch.Generator().manual_seed(100 + rank)
        for _ in range(7):
            images = torch.randn(4, 3, 8, 8, generator=generator)
            labels = torch.randint(0, 5, (4,), generator=generator)
            loss = F.cross_entropy(ddp(images), labels)
            optimizer.zero_grad()
            loss.backward()
            algorithm.after_backward()
            optimizer.step()
            algorithm.step()
        assert algorithm.done
        local_stats = model.bn0.running_mean.clone()
        broadcast_buffers(model)  # DDP syncs buffers before each forward: after the last one they differ
        ddp_result = {"local_bn0_mean": local_stats,"choices": mutator.current_choices,
                      "indices": {u.name: u.current_index.tolist() for u in mutator.mutable_units},
                      "exported": {k: v.clone() for k, v in algorithm.export().state_dict().items()}}

        # 2. No DDP and deliberately different weights: rank 0's L1 ranking must win everywhere.
        model, mutator = _prepared("L1MutableChannelUnit")
        if rank == 1:
            with torch.no_grad():
                model.conv0.weight.mul_(torch.linspace(3.0, 0.1, 8).view(8, 1, 1, 1))
        algorithm = ItePruneAlgorithm(model, mutator, 0.5, step_freq=1, prune_times=1)
        residual = next(u for u in mutator.mutable_units if u.name == RESIDUAL)
        local = residual.channel_importance().topk(residual.num_channels // 2).indices.sort().values.tolist()
        algorithm.step()
        follow_result = {"local_ranking": {RESIDUAL: local},
                         "indices": {u.name: u.current_index.tolist() for u in mutator.mutable_units}}
        # 3. GroupFisher under DDP, each rank on its own data: the Fisher information is summed over the ranks
        #    before the global ranking, so both prune the same channel.
        from pyprune.algorithms import GroupFisherAlgorithm
        torch.manual_seed(0)
        model = SmallNet()
        algorithm = GroupFisherAlgorithm(model, dict(type="GroupFisherChannelMutator",
                                                     parse_cfg=dict(demo_input=(1, 3, 8, 8))), interval=1)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        generator = torch.Generator().manual_seed(200 + rank)
        images, labels = torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 5, (4,), generator=generator)
        F.cross_entropy(ddp(images), labels).backward()
        units = algorithm.mutator.mutable_units
        local = {u.name: u.normalized(u.batch_fisher()) for u in units}
        algorithm.after_backward()
        summed = {u.name: u.normalized_fisher_info.clone() for u in units}
        assert algorithm.step()
        pruned = algorithm.mutator._by_name[algorithm.history[-1]["unit"]]
        fisher_result = {"local": local, "summed": summed, "pruned_groups": pruned.groups,
                         "indices": {u.name: u.current_index.tolist() for u in units}}
        torch.save({"ddp": ddp_result, "follow": follow_result, "fisher": fisher_result},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path):
    return run_two_ranks(_worker, tmp_path, TIMEOUT_S)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("ddp"))


def test_ddp_ranks_prune_identically(results):
    rank0, rank1 = results[0]["ddp"], results[1]["ddp"]
    assert not torch.equal(rank0["local_bn0_mean"], rank1["local_bn0_mean"]), "BN statistics must be training"
    assert rank0["choices"] == rank1["choices"]
    assert rank0["indices"] == rank1["indices"]
    assert any(len(index) < 8 for index in rank0["indices"].values())
    assert rank0["exported"].keys() == rank1["exported"].keys()
    for name, tensor in rank0["exported"].items():
        assert torch.equal(tensor, rank1["exported"][name]), name


def test_ranks_follow_rank0_selection(results):
    rank0, rank1 = results[0]["follow"], results[1]["follow"]
    assert rank1["local_ranking"][RESIDUAL] != rank0["local_ranking"][RESIDUAL], "the ranks must disagree locally"
    assert rank0["indices"] == rank1["indices"]
    assert rank1["indices"][RESIDUAL] == rank0["local_ranking"][RESIDUAL]


def test_group_fisher_ranks_sum_their_fisher_and_prune_the_same_channel(results):
    rank0, rank1 = results[0]["fisher"], results[1]["fisher"]
    assert rank0["local"].keys() == rank0["summed"].keys() and len(rank0["local"]) >= 2
    for name, local in rank0["local"].items():
        assert not torch.allclose(local, rank1["local"][name])  # each rank its own data
        torch.testing.assert_close(rank0["summed"][name], local + rank1["local"][name])
        torch.testing.assert_close(rank1["summed"][name], rank0["summed"][name])
    assert rank0["indices"] == rank1["indices"]
    widths = {name: len(index) for name, index in rank0["indices"].items()}
    # one channel went (one per group of a grouped conv's unit)
    assert sum(widths.values()) == sum(len(i) for i in rank0["local"].values()) - rank0["pruned_groups"]


def test_torchrun_main_job(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "pyprune", "prune", "--quick",
               "--unit-type", "taylor", "--no-progress", "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_agree"] is True
    assert summary["params_after"] < summary["params_before"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(summary["files"] + ["checkpoint.pt"])
