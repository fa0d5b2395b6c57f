"""``torch.distributed`` setup for the main job: torchrun's environment -> process group, device, rank."""
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1  # processes on this machine (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``'auto'``: this rank's GPU if there is one, else the CPU; ``'cpu'``, ``'cuda'``, ``'cuda:1'`` as given."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup_distributed(device_name: str) -> DistributedContext:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return DistributedContext(rank, world_size, local_rank, device, max(1, local_world_size))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads(local_world_size: int = 1) -> int:
    """Intra-op threads for one of ``local_world_size`` processes sharing this machine: its share of the cores,
    and never more than torch's own default (physical cores), so ranks do not oversubscribe the CPU."""
    return max(1, min(torch.get_num_threads(), usable_cores() // max(1, local_world_size)))


def configure_threads(requested: Optional[int] = None, local_world_size: int = 1) -> int:
    """Set ``torch.set_num_threads`` for this process and return the count used.

    ``requested`` (``--threads``) wins; else ``OMP_NUM_THREADS`` when set (torch already applied it; torchrun sets
    1 per rank unless you set it); else :func:`default_threads`.
    """
    if requested is None and os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    threads = requested if requested is not None else default_threads(local_world_size)
    torch.set_num_threads(threads)
    return threads


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_ranks_agree(value: str, context: DistributedContext) -> bool:
    """Whether every rank passed the same string (e.g. a digest of its exported weights)."""
    if not context.distributed:
        return True
    values = [None] * context.world_size
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP does this at the start of each training forward, so after the last one every rank holds statistics of its
    own last batch; call this before evaluating or exporting to make all ranks hold the same model.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src)
