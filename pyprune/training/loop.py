"""The plain PyTorch pieces of the main job: one training iteration, evaluation, the learning-rate schedule."""
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.loaders import shard_indices


def train_iteration(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                    algorithm=None) -> torch.Tensor:
    """Forward, backward, ``algorithm.after_backward()`` (importance), optimizer step; returns the loss (a tensor,
    not synced to the host). ``images``: ``[N, 3, H, W]``, ``labels``: int64 ``[N]``, both on the model's device."""
    model.train()
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if algorithm is not None:
        algorithm.after_backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, rank: int = 0,
             world_size: int = 1) -> float:
    """Top-1 accuracy in [0, 1] over all of ``dataset``; under ``torch.distributed`` each rank scores its shard and
    the counts are summed, so every rank returns the same number."""
    was_training = model.training
    model.eval()
    shard = Subset(dataset, shard_indices(len(dataset), rank, world_size))
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total
    for images, labels in DataLoader(shard, batch_size=batch_size):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        counts[0] += (model(images).argmax(1) == labels).sum()
        counts[1] += labels.numel()
    if world_size > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    correct, total = counts.tolist()
    return correct / total if total else float("nan")


def cosine_lr(base_lr: float, position: int, length: int, final_fraction: float = 0.0) -> float:
    """Cosine decay from ``base_lr`` (position 0) to ``base_lr * final_fraction`` (position ``length``)."""
    if length <= 0:
        return base_lr
    progress = min(max(position / length, 0.0), 1.0)
    low = base_lr * final_fraction
    return low + (base_lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (``model`` itself otherwise)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def first_device(model: nn.Module, default: Optional[torch.device] = None) -> torch.device:
    return next((p.device for p in model.parameters()), default or torch.device("cpu"))
