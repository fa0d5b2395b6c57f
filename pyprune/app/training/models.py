"""Models for the main job: pyprune's small default CNN or any torchvision classifier (``weights=None``)."""
from typing import List

import torch.nn.functional as F
from torch import Tensor, nn

from .config import DEFAULT_MODEL, LANGUAGE_MODELS


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn + shortcut (1x1 conv-bn when the shape changes), relu. ``[N, C_in, H, W] -> [N,
    C_out, H / stride, W / stride]``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: stem, three stages of basic blocks (stride 1, 2, 2), global pool, linear.

    ``[N, 3, H, W] -> [N, num_classes]`` for any ``H, W >= 8``. With the default widths (16, 32, 64) and one block
    per stage it has about 78 k parameters and 25 MFLOPs at 32x32: it trains in seconds per epoch on a CPU.
    """

    def __init__(self, num_classes: int = 10, widths=(16, 32, 64), blocks_per_stage: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages: List[nn.Module] = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                blocks.append(BasicBlock(in_channels, width, 2 if index > 0 and block == 0 else 1))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def classification_model_names() -> List[str]:
    """Every name :func:`build_model` accepts: the built-in default, then torchvision's classifiers."""
    import torchvision
    return [DEFAULT_MODEL] + sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialized model (never downloads weights); for a language model ``num_classes`` is the
    vocabulary size. Unknown name -> ``ValueError``."""
    if name == DEFAULT_MODEL:
        return SmallResNet(num_classes)
    if name in LANGUAGE_MODELS:
        from .lm import build_language_model  # (transformers is imported only for these)
        return build_language_model(name, num_classes)
    import torchvision
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown model {name!r}: use {DEFAULT_MODEL!r} or a torchvision classification model "
                         f"name (e.g. resnet18, mobilenet_v3_small)")
    kwargs = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False  # aux heads only run in train mode and need ImageNet-sized inputs
        kwargs["init_weights"] = True
    return torchvision.models.get_model(name, **kwargs)
