"""A learnable synthetic image-classification dataset that pyprune generates itself (no downloads).

Each class is a shape (disk, square, ring, cross, triangle, diamond, or a box filled with horizontal, vertical,
diagonal stripes or a checkerboard) drawn at a random position and size, in a random bright colour on a random dark
background, plus Gaussian pixel noise. Colour and position carry no class information, so a model has to learn the
shapes: a small CNN gets well above chance (10 %) in a few epochs but not instantly to 100 %.

Images are drawn when they are read, each from its own generator seeded by ``(seed, index)``: a dataset costs only
its labels in memory at any image size, and sample ``i`` is the same on every read, in every process.
"""
import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

CLASS_NAMES = ("disk", "square", "ring", "cross", "triangle", "diamond", "h_stripes", "v_stripes", "d_stripes",
               "checker")
NUM_CLASSES = len(CLASS_NAMES)
# The mean / std of the generated pixels are about 0.24 / 0.30 in every channel; images are normalized with them.
_MEAN, _STD = 0.24, 0.30


def _shape_mask(label: int, u: Tensor, v: Tensor) -> Tensor:
    """The mask of class ``label``: ``u, v`` are ``[N, H, W]`` coordinates relative to each shape's centre, in
    units of its size; returns a bool ``[N, H, W]``."""
    box = (u.abs() < 1) & (v.abs() < 1)
    wave = math.pi * 2.5
    name = CLASS_NAMES[label]
    if name in ("disk", "ring"):
        radius = torch.sqrt(u * u + v * v)
        return radius < 1 if name == "disk" else (radius > 0.55) & (radius < 1)
    if name == "square":
        return (u.abs() < 0.8) & (v.abs() < 0.8)
    if name == "cross":
        return ((u.abs() < 0.3) & (v.abs() < 1)) | ((v.abs() < 0.3) & (u.abs() < 1))
    if name == "triangle":
        return (v > -0.8) & (v < 0.8) & (u.abs() < (v + 0.8) * 0.6)
    if name == "diamond":
        return u.abs() + v.abs() < 1
    stripes = {"h_stripes": torch.sin(v * wave), "v_stripes": torch.sin(u * wave),
               "d_stripes": torch.sin((u + v) * wave * 0.7)}
    pattern = stripes[name] if name in stripes else torch.sin(u * wave * 0.8) * torch.sin(v * wave * 0.8)
    return box & (pattern > 0)


def _sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` of the dataset seeded ``seed`` (splitmix64 finaliser), so that
    neighbouring indices and seeds get unrelated random streams."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


def generate_images(labels: Sequence[int], seeds: Sequence[int], image_size: int, noise: float = 0.25,
                    size_classes: int = 1) -> Tensor:
    """Draw image ``k`` of class ``labels[k]`` from a generator seeded with ``seeds[k]``: float ``[N, 3, image_size,
    image_size]``, normalized. Each image depends only on its own label and seed, not on the others in the call.

    ``size_classes > 1``: label ``l`` is shape ``l % 10`` drawn in size band ``l // 10`` of ``size_classes`` equal
    bands of the size range, so neighbouring bands differ only slightly in size (a harder, less separable task)."""
    n = len(labels)
    params = torch.empty(n, 10)                      # centre (2), size, background (3), contrast, foreground (3)
    noise_maps = torch.empty(n, 3, image_size, image_size)
    for k, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        params[k] = torch.rand(10, generator=generator)
        noise_maps[k] = torch.randn(3, image_size, image_size, generator=generator)
    centre = (params[:, 0:2] - 0.5) * 0.8                                          # shapes stay mostly inside
    label_tensor = torch.as_tensor(list(labels), dtype=torch.int64)
    band = (label_tensor // NUM_CLASSES).float()
    size = (0.3 + (band + params[:, 2]) / size_classes * 0.3)[:, None, None]
    background = 0.4 * params[:, 3:6, None, None]
    contrast = 0.25 + 0.35 * params[:, 6, None, None, None]
    foreground = background + contrast * (0.5 + 0.5 * params[:, 7:10, None, None])

    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size * 2 - 1   # [-1, 1]
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    u = (x.unsqueeze(0) - centre[:, 0, None, None]) / size
    v = (y.unsqueeze(0) - centre[:, 1, None, None]) / size
    shapes = label_tensor % NUM_CLASSES
    mask = torch.zeros(n, image_size, image_size)
    for label in shapes.unique().tolist():    # one shape at a time: memory N*H*W, not classes*N*H*W
        rows = (shapes == label).nonzero().flatten()
        mask[rows] = _shape_mask(label, u[rows], v[rows]).float()
    images = background + (foreground - background) * mask.unsqueeze(1)
    images = images + noise * noise_maps
    return (images - _MEAN) / _STD


class SyntheticShapes(Dataset):
    """``num_samples`` images ``[3, image_size, image_size]`` (normalized float) with labels in ``[0, 10)``.

    Fully determined by ``seed``: the same seed gives the same images and labels, so a train split and a val split
    are two instances with different seeds (see :func:`synthetic_splits`). Labels are balanced (round robin, then
    shuffled) and held in memory; images are drawn on read (``__getitems__`` draws a whole batch in one go for a
    ``DataLoader``), so memory does not grow with ``num_samples * image_size**2``.
    """

    num_classes = NUM_CLASSES
    classes = list(CLASS_NAMES)

    def __init__(self, num_samples: int, image_size: int = 32, seed: int = 0, noise: float = 0.25,
                 size_classes: int = 1):
        if num_samples < 1 or image_size < 8 or size_classes < 1:
            raise ValueError(f"SyntheticShapes needs num_samples >= 1, image_size >= 8 and size_classes >= 1, got "
                             f"{num_samples}, {image_size}, {size_classes}")
        self.image_size, self.seed, self.noise, self.size_classes = image_size, seed, noise, size_classes
        if size_classes > 1:  # shape x size band: 10 * size_classes classes
            self.num_classes = NUM_CLASSES * size_classes
            self.classes = [f"{name}_{band}" for band in range(size_classes) for name in CLASS_NAMES]
        labels = torch.arange(num_samples) % self.num_classes
        self.labels = labels[torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))]

    def __len__(self) -> int:
        return self.labels.numel()

    def _check(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"SyntheticShapes index {index} out of range for {len(self)} samples")
        return index % len(self)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> List[Tuple[Tensor, int]]:
        indices = [self._check(int(i)) for i in indices]
        labels = [int(self.labels[i]) for i in indices]
        images = generate_images(labels, [_sample_seed(self.seed, i) for i in indices], self.image_size, self.noise,
                                 self.size_classes)
        return list(zip(images, labels))


def synthetic_splits(num_train: int, num_val: int, image_size: int = 32, seed: int = 0):
    """(train, val) datasets drawn independently (different seeds) from the same distribution."""
    return (SyntheticShapes(num_train, image_size, seed=2 * seed + 1),
            SyntheticShapes(num_val, image_size, seed=2 * seed + 2))


HARD_SIZE_CLASSES, HARD_NOISE = 2, 0.35


def hard_synthetic_splits(num_train: int, num_val: int, image_size: int = 32, seed: int = 0):
    """(train, val) of the harder variant: 20 classes (every shape in two adjacent size bands) and stronger
    pixel noise, so classes overlap more and a model stays further from 100 %."""
    return (SyntheticShapes(num_train, image_size, 2 * seed + 1, HARD_NOISE, HARD_SIZE_CLASSES),
            SyntheticShapes(num_val, image_size, 2 * seed + 2, HARD_NOISE, HARD_SIZE_CLASSES))
