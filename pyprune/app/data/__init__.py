"""Datasets and loaders for pyprune's main job: a built-in synthetic dataset, ImageFolder, resumable sampling,
image file checks."""
from .images import CorruptImageError, check_image_files, load_rgb_image
from .loaders import ResumableSampler, build_datasets, make_train_loader, shard_indices
from .synthetic import CLASS_NAMES, SyntheticShapes, synthetic_splits

__all__ = ["CLASS_NAMES", "SyntheticShapes", "synthetic_splits", "ResumableSampler", "build_datasets",
           "make_train_loader", "shard_indices", "CorruptImageError", "check_image_files", "load_rgb_image"]
