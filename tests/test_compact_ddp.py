"""Compact training mode under DistributedDataParallel: two gloo processes, two pruning steps.

DDP binds its gradient buckets to the parameter shapes when it is built, so at every structure change each rank
changes the selection (with the session paused, rank 0's selection broadcast) and rebuilds DDP with
``pyprune.ops.compact.rebuild_ddp``. The ranks train on different data; DDP all-reduces the *compact* gradients,
so the ranks must end with identical weights, optimizer state and exported models.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import join_two_rank_gloo, run_two_ranks

pytestmark = pytest.mark.ddp
TIMEOUT_S = 120


def _worker(rank: int, port: int, out_dir: str) -> None:
    from helpers import prepared_zoo_net as prepared

    from pyprune.algorithms.unit_state import broadcast_selections
    from pyprune.ops import compact_training
    from pyprune.ops.compact import rebuild_ddp
    from pyprune.app.training.distributed import broadcast_buffers
    join_two_rank_gloo(rank, port)
    try:
        model, mutator = prepared()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        session = compact_training(model, optimizer)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        generator = torch.Generator().manual_seed(100 + rank)
        shapes = []
        for ratio in (None, 0.75, 0.5):
            if ratio is not None:  # a pruning step: full tensors while the units rank, then DDP on the new shapes
                with session.paused():
                    mutator.set_global_ratio(ratio)
                    broadcast_selections(mutator.mutable_units)
                    # DDP syncs only the compact buffers from here on: agree on the statistics being set aside
                    broadcast_buffers(model)
                ddp = rebuild_ddp(ddp)
            for _ in range(2):
                images, labels = torch.randn(4, 3, 6, 6, generator=generator), torch.randint(0, 10, (4,),
                                                                                              generator=generator)
                optimizer.zero_grad()
                F.cross_entropy(ddp(images), labels).backward()
                optimizer.step()
            shapes.append((tuple(model.stem.weight.shape), tuple(model.stem.weight.grad.shape)))
        broadcast_buffers(model)  # DDP syncs BatchNorm statistics before each forward: after the last one they differ
        exported = {k: v.clone() for k, v in mutator.export(model).state_dict().items()}
        momentum = optimizer.state_dict()["state"][0]["momentum_buffer"].clone()
        session.exit()
        torch.save({"shapes": shapes, "exported": exported, "full": model.state_dict(), "momentum": momentum,
                    "indices": {u.name: u.current_index.tolist() for u in mutator.mutable_units}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_stay_identical_across_two_pruning_steps(tmp_path):
    rank0, rank1 = run_two_ranks(_worker, tmp_path, TIMEOUT_S)
    # compact all along: the parameters (and so the all-reduced gradients) shrink at each step
    assert rank0["shapes"] == [((16, 3, 3, 3), (16, 3, 3, 3)), ((12, 3, 3, 3), (12, 3, 3, 3)),
                               ((8, 3, 3, 3), (8, 3, 3, 3))]
    assert rank0["indices"] == rank1["indices"]
    for part in ("exported", "full"):
        assert rank0[part].keys() == rank1[part].keys()
        for name, tensor in rank0[part].items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(tensor, rank1[part][name]), f"{part} {name}"
    assert rank0["momentum"].shape == (16, 3, 3, 3) and torch.equal(rank0["momentum"], rank1["momentum"])
