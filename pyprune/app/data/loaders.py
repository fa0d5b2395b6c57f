"""Train / val datasets and a deterministic, resumable, rank-sharded train sampler."""
import os
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .images import check_image_files, load_rgb_image
from .synthetic import synthetic_splits

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_datasets(data: Optional[str], image_size: int, seed: int, num_train: int = 5000,
                   num_val: int = 1000) -> Tuple[Dataset, Dataset, int]:
    """``(train, val, num_classes)``.

    ``data=None``: the built-in :class:`~pyprune.app.data.SyntheticShapes` (``num_train`` / ``num_val`` images).
    Otherwise an ImageFolder root with ``train/`` and ``val/`` sub-folders (one folder per class in each), or a
    single class-per-folder root that is split 90 / 10 with ``seed``. Every image file is checked first
    (:func:`~pyprune.app.data.images.check_image_files`): a truncated or corrupt one raises ``CorruptImageError`` naming
    it, before any training.
    """
    if data is None:
        train, val = synthetic_splits(num_train, num_val, image_size, seed)
        return train, val, train.num_classes
    from torchvision import datasets, transforms
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    resize = int(round(image_size * 256 / 224))
    val_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                                 transforms.ToTensor(), normalize])
    train_dir, val_dir = os.path.join(data, "train"), os.path.join(data, "val")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        train = datasets.ImageFolder(train_dir, train_tf, loader=load_rgb_image)
        val = datasets.ImageFolder(val_dir, val_tf, loader=load_rgb_image)
        if train.classes != val.classes:
            raise ValueError(f"--data {data}: train/ and val/ have different class folders")
        check_image_files(path for path, _ in val.samples + train.samples)
        return train, val, len(train.classes)
    train_all = datasets.ImageFolder(data, train_tf, loader=load_rgb_image)
    val_all = datasets.ImageFolder(data, val_tf, loader=load_rgb_image)
    check_image_files(path for path, _ in train_all.samples)
    order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, len(order) // 10)
    val = torch.utils.data.Subset(val_all, order[:cut])
    train = torch.utils.data.Subset(train_all, order[cut:])
    return train, val, len(train_all.classes)


class ResumableSampler(Sampler[int]):
    """Shuffled indices for one rank, the same on every run: epoch ``e``'s order depends only on ``(seed, e)``.

    Like ``DistributedSampler`` (``drop_last=True``: every rank gets ``len(dataset) // world_size`` samples), plus
    :meth:`set_position` to start the epoch after a number of samples already seen (resuming mid-epoch).
    """

    def __init__(self, dataset_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset_size, self.seed, self.rank, self.world_size = dataset_size, seed, rank, world_size
        self.num_samples = dataset_size // world_size
        if self.num_samples < 1:
            raise ValueError(f"the train set has {dataset_size} samples, fewer than {world_size} ranks")
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_indices(self) -> List[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        return order[self.rank:self.num_samples * self.world_size:self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def make_train_loader(dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                      workers: int = 0) -> DataLoader:
    """A loader whose ``sampler`` is a :class:`ResumableSampler`; the last incomplete batch is dropped."""
    sampler = ResumableSampler(len(dataset), seed, rank, world_size)
    if len(sampler) < batch_size:
        raise ValueError(f"--batch-size {batch_size} is larger than the {len(sampler)} train samples per rank")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0)


def shard_indices(size: int, rank: int, world_size: int) -> List[int]:
    """This rank's part of an evaluation set (no padding: the parts cover every sample exactly once)."""
    return list(range(rank, size, world_size))


def batches_per_epoch(loader: DataLoader) -> int:
    return loader.sampler.num_samples // loader.batch_size


__all__ = ["build_datasets", "ResumableSampler", "make_train_loader", "shard_indices", "batches_per_epoch"]
