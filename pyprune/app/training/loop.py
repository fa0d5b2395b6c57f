"""The plain PyTorch pieces of the main job: evaluation and the learning-rate schedule (the training iteration is
:class:`.step.TrainStep`)."""
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.loaders import shard_indices


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
