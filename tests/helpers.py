"""Non-model helpers that more than one test file uses: markers, the layer-case table, channel selections and the
names of the boolean-slicing (mmrazor-style) reference the DynamicOps are checked against (pyprune.app.bench's).

Import by module name (``from helpers import CASES``); see tests/models.py for the shared models.
"""
import copy
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import pyprune.ops as ops
from models import ZooNet
from pyprune.app.bench.mmrazor_reference import masked_batch_norm, masked_forward, masked_weight
from pyprune.mutators import ChannelMutator

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: the op, the reference and the export differ only in summation order


# --------------------------------------------------------------------------------------------------- layer cases
@dataclass(frozen=True)
class Case:
    make: Callable[[], nn.Module]
    make_input: Callable[[int], torch.Tensor]     # active in channels -> input
    groups: int = 1                               # balanced blocks a selection must keep (both sides)


def _image(k, size=7):
    return torch.randn(2, k, size, size)


CASES = {
    "conv3x3": Case(lambda: nn.Conv2d(8, 6, 3, padding=1), _image),
    "conv_stride_dilation_nobias": Case(lambda: nn.Conv2d(5, 7, 3, stride=2, dilation=2, padding=2, bias=False),
                                        lambda k: _image(k, 9)),
    "conv_same_padding": Case(lambda: nn.Conv2d(6, 4, (3, 5), padding="same"), _image),
    "conv_reflect": Case(lambda: nn.Conv2d(6, 5, 3, padding=1, padding_mode="reflect"), _image),
    "conv_replicate": Case(lambda: nn.Conv2d(6, 5, 3, padding=2, padding_mode="replicate", stride=2), _image),
    "conv_circular": Case(lambda: nn.Conv2d(6, 5, 3, padding=1, padding_mode="circular"), _image),
    "conv_grouped": Case(lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4), _image, groups=4),
    "conv_grouped_1x1_nobias": Case(lambda: nn.Conv2d(12, 6, 1, groups=3, bias=False), _image, groups=3),
    "conv_depthwise": Case(lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), _image),
    "linear": Case(lambda: nn.Linear(10, 7), lambda k: torch.randn(3, k)),
    "linear_tokens_nobias": Case(lambda: nn.Linear(9, 6, bias=False), lambda k: torch.randn(2, 4, k)),
    "bn1d": Case(lambda: nn.BatchNorm1d(8), lambda k: torch.randn(6, k)),
    "bn1d_sequence": Case(lambda: nn.BatchNorm1d(8), lambda k: torch.randn(4, k, 5)),
    "bn2d": Case(lambda: nn.BatchNorm2d(8), lambda k: _image(k, 3)),
    "bn2d_no_affine": Case(lambda: nn.BatchNorm2d(8, affine=False), lambda k: _image(k, 3)),
    "bn2d_no_stats": Case(lambda: nn.BatchNorm2d(8, track_running_stats=False), lambda k: _image(k, 3)),
    "layernorm": Case(lambda: nn.LayerNorm(10), lambda k: torch.randn(2, 3, k)),
    "layernorm_no_affine": Case(lambda: nn.LayerNorm(10, elementwise_affine=False), lambda k: torch.randn(2, k)),
    "groupnorm": Case(lambda: nn.GroupNorm(3, 12), lambda k: _image(k, 3), groups=3),
}
SELECTIONS = ("one", "random", "all")


def randomize(module: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running stats, so a wrong channel shows up in the output."""
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point():
                tensor.normal_()
    return module


def channels(module: nn.Module):
    """(out channels, in channels, one selection for both) of a plain layer."""
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        return module.out_channels, module.in_channels, depthwise
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0], module.normalized_shape[0], True
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.num_channels, True
    return module.num_features, module.num_features, True  # batch norm


def random_mask(num_channels: int, kind: str, groups: int = 1, generator=None) -> torch.Tensor:
    """A bool mask ``[num_channels]`` keeping one channel per group ("one"), all, or a random balanced subset."""
    block = num_channels // groups
    if kind == "all":
        return torch.ones(num_channels, dtype=torch.bool)
    keep = 1 if kind == "one" else int(torch.randint(1, block + 1, (1,), generator=generator))
    mask = torch.zeros(groups, block, dtype=torch.bool)
    for g in range(groups):
        mask[g, torch.randperm(block, generator=generator)[:keep]] = True
    return mask.reshape(-1)


def prepared_case(case_name: str, selection: str, seed: int = 0, name: str = "net.layer"):
    """(dynamic op with a selection, plain reference copy, out mask, in mask, input) for ``CASES[case_name]``."""
    case = CASES[case_name]
    generator = torch.Generator().manual_seed(seed)
    plain = randomize(case.make())
    reference = copy.deepcopy(plain)
    op = ops.to_dynamic(plain)
    op.pyprune_name = name
    full_out, full_in, single = channels(plain)
    out_mask = random_mask(full_out, selection, case.groups, generator)
    in_mask = out_mask if single else random_mask(full_in, selection, case.groups, generator)
    op.set_out_channels(out_mask)
    if not single:
        op.set_in_channels(in_mask)
    x = case.make_input(int(in_mask.sum()))
    return op, reference, out_mask, in_mask, x


def same_index(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """Two selections (``None`` = all channels) are equal."""
    return a is b is None or (a is not None and b is not None and torch.equal(a, b))


# ------------------------------------------------------------------------------ boolean-slicing (mmrazor) reference
# One reference for the whole project: the benchmark's mmrazor-style slicing (pyprune/app/bench/mmrazor_reference.py).
# reference_forward(module, out_mask, in_mask, x), reference_weight(module, out_mask, in_mask) -> compact weight,
# reference_batch_norm(bn, mask, x): what mmrazor computes with the full ``module`` and bool masks.
reference_forward = masked_forward
reference_weight = masked_weight
reference_batch_norm = masked_batch_norm


# ---- compact-mode and multi-process test helpers -------------------------------------------------------------
def prepared_zoo_net(unit_type="L1MutableChannelUnit", model_type=None):
    """A prepared :class:`models.ZooNet` (or ``model_type``) with ratio-mode units of ``unit_type``, seed 0."""
    torch.manual_seed(0)
    model = (model_type or ZooNet)()
    mutator = ChannelMutator(channel_unit_cfg=dict(type=unit_type, default_args=dict(choice_mode="ratio")),
                             parse_cfg=dict(demo_input=(1, 3, 6, 6)))
    mutator.prepare_from_supernet(model)
    return model, mutator


def batches(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 6, 6, generator=generator), torch.randint(0, 10, (4,), generator=generator))
            for _ in range(count)]


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a gloo rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_two_rank_gloo(rank: int, port: int) -> None:
    """In a worker of :func:`run_two_ranks`: join the 2-rank gloo group on ``port`` (60 s timeout), one torch
    thread per rank (two ranks share this machine's cores)."""
    import torch.distributed as dist
    from datetime import timedelta
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)


def run_two_ranks(worker, out_dir, timeout_s: float = 120.0):
    """Spawn ``worker(rank, port, out_dir)`` on 2 processes, fail the test if they take longer than ``timeout_s``,
    and return what each rank saved as ``out_dir/rank{r}.pt`` (loaded with ``weights_only=True``)."""
    context = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2-process gloo run did not finish within {timeout_s} s")
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=True) for r in (0, 1)]
