"""Datasets of the main job: the synthetic shapes are drawn lazily and deterministically; ImageFolder files that
cannot be decoded stop the job at the start, in one line naming the file."""
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pyprune.app import cli
from pyprune.app.data import (CorruptImageError, SyntheticShapes, build_datasets, check_image_files, load_rgb_image,
                          synthetic_splits)

TINY = ("prune", "--quick", "--no-progress", "--train-samples", "64", "--val-samples", "16", "--batch-size", "8")


# ------------------------------------------------------------------------------------------ synthetic shapes
def test_samples_are_drawn_on_read_and_are_the_same_on_every_read():
    shapes = SyntheticShapes(200, 16, seed=3)
    again = SyntheticShapes(200, 16, seed=3)
    image, label = shapes[17]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and 0 <= label < 10
    assert torch.equal(image, again[17][0]) and label == again[17][1]
    assert torch.equal(image, shapes[17][0]) and torch.equal(shapes[-1][0], shapes[199][0])
    assert not torch.equal(image, shapes[18][0])
    assert not torch.equal(image, SyntheticShapes(200, 16, seed=4)[17][0])
    with pytest.raises(IndexError, match="200 samples"):
        shapes[200]


def test_a_batch_read_equals_the_samples_read_one_by_one():
    shapes = SyntheticShapes(100, 12, seed=1)
    indices = [5, 0, 99, 5, 42]
    batch = shapes.__getitems__(indices)
    for index, (image, label) in zip(indices, batch):
        assert torch.equal(image, shapes[index][0]) and label == shapes[index][1]
    images, labels = next(iter(DataLoader(shapes, batch_size=10)))  # the DataLoader uses __getitems__
    assert torch.equal(images[3], shapes[3][0]) and labels.tolist() == shapes.labels[:10].tolist()


def test_labels_are_balanced_and_pixels_roughly_normalized():
    train, val = synthetic_splits(500, 100, 32, seed=0)
    assert torch.bincount(train.labels, minlength=10).tolist() == [50] * 10
    assert not torch.equal(train[0][0], val[0][0])
    images = torch.stack([image for image, _ in train.__getitems__(range(200))])
    assert abs(float(images.mean())) < 0.2 and 0.8 < float(images.std()) < 1.2


def test_a_large_image_size_costs_no_memory_up_front():
    start = time.perf_counter()
    shapes = SyntheticShapes(1_000_000, 512, seed=0)
    assert time.perf_counter() - start < 5.0
    held = sum(v.numel() * v.element_size() for v in vars(shapes).values() if isinstance(v, torch.Tensor))
    assert held <= 8 * 1_000_000  # the labels only, not 1e6 * 3 * 512 * 512 floats (3 TB)
    assert shapes[123_456][0].shape == (3, 512, 512)


# -------------------------------------------------------------------------------------------- image folders
def _image_folder(root: Path, splits=("train", "val"), per_class: int = 6, image_size: int = 16):
    from torchvision.utils import save_image
    shapes = SyntheticShapes(per_class * 10, image_size, seed=1)
    for split in splits:
        for i in range(len(shapes)):
            image, label = shapes[i]
            folder = root / split / shapes.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            save_image(image * 0.3 + 0.24, folder / f"{i}.jpg")
    return root


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def test_a_truncated_val_image_fails_before_pretraining_in_one_line_naming_it(tmp_path, capsys):
    root = _image_folder(tmp_path / "images")
    bad = _truncate(sorted((root / "val" / "ring").iterdir())[0])
    out = tmp_path / "out"
    assert cli.main([*TINY, "--data", str(root), "--output-dir", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"pyprune prune: error: {bad}: cannot read this image (Truncated File Read); remove or replace "
                     f"the file"]
    assert not (out / "checkpoint.pt").exists()  # nothing was trained


def test_a_truncated_image_in_a_single_folder_root_is_named(tmp_path):
    root = _image_folder(tmp_path / "images", splits=("all",)) / "all"
    bad = _truncate(sorted((root / "disk").iterdir())[2])
    with pytest.raises(CorruptImageError, match=str(bad)):
        build_datasets(str(root), 16, seed=0)


def test_complete_images_pass_including_bytes_after_the_end_marker(tmp_path):
    root = _image_folder(tmp_path / "images", splits=("train",), per_class=1)
    files = sorted((root / "train").rglob("*.jpg"))
    with open(files[0], "ab") as handle:
        handle.write(b"trailing metadata some cameras append")
    check_image_files(files)
    assert load_rgb_image(str(files[0])).size == (16, 16)
    not_an_image = root / "train" / "disk" / "notes.jpg"
    not_an_image.write_text("hello")
    with pytest.raises(CorruptImageError, match="notes.jpg: cannot read this image"):
        check_image_files(files + [not_an_image])


def test_a_bad_file_read_in_a_loader_worker_is_still_one_line_naming_it(tmp_path):
    from torchvision import datasets, transforms
    root = _image_folder(tmp_path / "images", splits=("train",), per_class=1)
    bad = _truncate(sorted((root / "train" / "cross").iterdir())[0])
    folder = datasets.ImageFolder(str(root / "train"), transforms.ToTensor(), loader=load_rgb_image)
    with pytest.raises(CorruptImageError) as caught:
        list(DataLoader(folder, batch_size=10, num_workers=1))
    assert cli._one_line(caught.value) == f"{bad}: cannot read this image (Truncated File Read); remove or replace " \
                                          f"the file"
