"""A learnable synthetic image-classification dataset that pyprune generates itself (no downloads).

Each class is a shape (disk, square, ring, cross, triangle, diamond, or a box filled with horizontal, vertical,
diagonal stripes or a checkerboard) drawn at a random position and size, in a random bright colour on a random dark
background, plus Gaussian pixel noise. Colour and position carry no class information, so a model has to learn the
shapes: a small CNN gets well above chance (10 %) in a few epochs but not instantly to 100 %.
"""
import math
from typing import Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

CLASS_NAMES = ("disk", "square", "ring", "cross", "triangle", "diamond", "h_stripes", "v_stripes", "d_stripes",
               "checker")
NUM_CLASSES = len(CLASS_NAMES)
# The mean / std of the generated pixels are about 0.24 / 0.30 in every channel; images are normalized with them.
_MEAN, _STD = 0.24, 0.30


def _shape_masks(u: Tensor, v: Tensor) -> Tensor:
    """``u, v``: ``[N, H, W]`` coordinates relative to each shape's centre, in units of its size.

    Returns ``[C, N, H, W]`` float masks in [0, 1], one per class (``C = NUM_CLASSES``).
    """
    box = (u.abs() < 1) & (v.abs() < 1)
    radius = torch.sqrt(u * u + v * v)
    wave = math.pi * 2.5
    masks = [
        radius < 1,                                                            # disk
        (u.abs() < 0.8) & (v.abs() < 0.8),                                     # square
        (radius > 0.55) & (radius < 1),                                        # ring
        ((u.abs() < 0.3) & (v.abs() < 1)) | ((v.abs() < 0.3) & (u.abs() < 1)), # cross
        (v > -0.8) & (v < 0.8) & (u.abs() < (v + 0.8) * 0.6),                  # triangle
        u.abs() + v.abs() < 1,                                                 # diamond
        box & (torch.sin(v * wave) > 0),                                       # horizontal stripes
        box & (torch.sin(u * wave) > 0),                                       # vertical stripes
        box & (torch.sin((u + v) * wave * 0.7) > 0),                           # diagonal stripes
        box & (torch.sin(u * wave * 0.8) * torch.sin(v * wave * 0.8) > 0),     # checkerboard
    ]
    return torch.stack(masks).float()


def generate_images(labels: Tensor, image_size: int, generator: torch.Generator, noise: float = 0.25) -> Tensor:
    """Draw one image per label: ``labels`` int64 ``[N]`` -> float ``[N, 3, image_size, image_size]`` (normalized)."""
    n = labels.numel()
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size * 2 - 1   # [-1, 1]
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    centre = (torch.rand(n, 2, generator=generator) - 0.5) * 0.8                  # shapes stay mostly inside
    size = 0.3 + torch.rand(n, 1, 1, generator=generator) * 0.3
    u = (x.unsqueeze(0) - centre[:, 0, None, None]) / size
    v = (y.unsqueeze(0) - centre[:, 1, None, None]) / size
    masks = _shape_masks(u, v)                                                      # [C, N, H, W]
    mask = masks[labels, torch.arange(n)]                                           # [N, H, W]
    background = 0.4 * torch.rand(n, 3, 1, 1, generator=generator)
    contrast = 0.25 + 0.35 * torch.rand(n, 1, 1, 1, generator=generator)
    foreground = background + contrast * (0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=generator))
    images = background + (foreground - background) * mask.unsqueeze(1)
    images = images + noise * torch.randn(images.shape, generator=generator)
    return (images - _MEAN) / _STD


class SyntheticShapes(Dataset):
    """``num_samples`` images ``[3, image_size, image_size]`` (normalized float) with labels in ``[0, 10)``.

    Fully determined by ``seed``: the same seed gives the same images and labels, so a train split and a val split
    are two instances with different seeds (see :func:`synthetic_splits`). Labels are balanced (round robin, then
    shuffled). Images are generated once, up front (``num_samples * 3 * image_size**2`` floats).
    """

    num_classes = NUM_CLASSES
    classes = list(CLASS_NAMES)

    def __init__(self, num_samples: int, image_size: int = 32, seed: int = 0, noise: float = 0.25):
        if num_samples < 1 or image_size < 8:
            raise ValueError(f"SyntheticShapes needs num_samples >= 1 and image_size >= 8, got {num_samples}, "
                             f"{image_size}")
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(num_samples) % NUM_CLASSES
        self.labels = labels[torch.randperm(num_samples, generator=generator)]
        chunks = [generate_images(part, image_size, generator, noise) for part in self.labels.split(1024)]
        self.images = torch.cat(chunks)

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def synthetic_splits(num_train: int, num_val: int, image_size: int = 32, seed: int = 0):
    """(train, val) datasets drawn independently (different generator streams) from the same distribution."""
    return (SyntheticShapes(num_train, image_size, seed=2 * seed + 1),
            SyntheticShapes(num_val, image_size, seed=2 * seed + 2))
