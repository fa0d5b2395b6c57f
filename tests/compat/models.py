"""mmrazor's small test models (tests/data/models.py there), written here from their documented graphs, and
classifiers named the way mmcls names modules (``backbone.`` / ``neck`` / ``head.fc``), so unit names can be
compared with the names in mmrazor's published configs.

Every model takes ``[N, 3, H, W]`` and returns ``[N, 1000]`` logits (the mmcls wrappers: ``num_classes``).
"""
import torch
import torchvision
from torch import nn

from pyprune.compat.mmrazor import MODELS


class LinearHead(nn.Module):
    """Global average pool, flatten, linear (mmrazor's ``LinearHeadForTest``)."""

    def __init__(self, in_channels: int, num_classes: int = 1000):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.linear(self.pool(x).flatten(1))


@MODELS.register_module()
class SingleLineModel(nn.Module):
    """conv-bn-relu-conv-bn-pool, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 1, 1),
                                 nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1))
        self.linear = nn.Linear(16, 1000)

    def forward(self, x):
        x = self.net(x)
        return self.linear(x.reshape([x.shape[0], -1]))


class ExpandLineModel(SingleLineModel):
    """As SingleLineModel, pooled to 2x2: the Linear reads each of the 16 channels 4 times (flatten -> Linear)."""

    def __init__(self):
        super().__init__()
        self.net[-1] = nn.AdaptiveAvgPool2d(2)
        self.linear = nn.Linear(64, 1000)


class ResBlock(nn.Module):
    """op1-bn1 feeds op2-bn2 and a shortcut; their sum feeds op3."""

    def __init__(self):
        super().__init__()
        self.op1, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.op2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.op3 = nn.Conv2d(8, 8, 1)
        self.head = LinearHead(8)

    def forward(self, x):
        x1 = self.bn1(self.op1(x))
        x2 = self.bn2(self.op2(x1))
        return self.head(self.op3(x2 + x1))


class ConcatModel(nn.Module):
    """Two conv-bn branches concatenated into op3."""

    def __init__(self):
        super().__init__()
        self.op1, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.op2, self.bn2 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.op3 = nn.Conv2d(16, 8, 1)
        self.head = LinearHead(8)

    def forward(self, x):
        return self.head(self.op3(torch.cat([self.bn1(self.op1(x)), self.bn2(self.op2(x))], dim=1)))


class AddCatModel(nn.Module):
    """cat(op1: 2, op2: 6) + cat(op3: 4, op4: 4) into op5: the two concatenations are split where they differ."""

    def __init__(self):
        super().__init__()
        self.op1, self.op2 = nn.Conv2d(3, 2, 3), nn.Conv2d(3, 6, 3)
        self.op3, self.op4 = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.op5 = nn.Conv2d(8, 16, 3)
        self.head = LinearHead(16)

    def forward(self, x):
        left = torch.cat((self.op1(x), self.op2(x)), dim=1)
        right = torch.cat((self.op3(x), self.op4(x)), dim=1)
        return self.head(self.op5(left + right))


class GroupWiseConvModel(nn.Module):
    """conv-bn, grouped conv (groups=2)-bn, conv."""

    def __init__(self):
        super().__init__()
        self.op1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8)
        self.op2, self.bn2 = nn.Conv2d(8, 16, 3, 1, 1, groups=2), nn.BatchNorm2d(16)
        self.op3 = nn.Conv2d(16, 32, 3, 1, 1)
        self.head = LinearHead(32)

    def forward(self, x):
        return self.head(self.op3(self.bn2(self.op2(self.bn1(self.op1(x))))))


class Xmodel(nn.Module):
    """op1 * op2 feeds op3 and op4, whose sum is the output stream."""

    def __init__(self):
        super().__init__()
        self.op1, self.op2 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(3, 8, 3, 1, 1)
        self.op3, self.op4 = nn.Conv2d(8, 16, 3, 1, 1), nn.Conv2d(8, 16, 3, 1, 1)
        self.head = LinearHead(16)

    def forward(self, x):
        x12 = self.op1(x) * self.op2(x)
        return self.head(self.op3(x12) + self.op4(x12))


class MultipleUseModel(nn.Module):
    """One conv (``conv_multiple_use``) applied to the outputs of four convs; the four results concatenated."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(3, 8, 3, 1, 1)
        self.conv2, self.conv3 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(3, 8, 3, 1, 1)
        self.conv_multiple_use = nn.Conv2d(8, 16, 3, 1, 1)
        self.conv_last = nn.Conv2d(16 * 4, 32, 3, 1, 1)
        self.head = LinearHead(32)

    def forward(self, x):
        branches = [conv(x) for conv in (self.conv0, self.conv1, self.conv2, self.conv3)]
        shared = [self.conv_multiple_use(branch) for branch in branches]
        return self.head(self.conv_last(torch.cat(shared, dim=1)))


class MultiBindModel(nn.Module):
    """conv1 + conv2 feeds conv3, and is added to conv3's output again."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(3, 8, 3, 1, 1)
        self.conv3 = nn.Conv2d(8, 8, 3, 1, 1)
        self.head = LinearHead(8)

    def forward(self, x):
        x12 = self.conv1(x) + self.conv2(x)
        return self.head(x12 + self.conv3(x12))


class DwConvModel(nn.Module):
    """conv-bn-relu, depthwise conv-bn-relu."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 48, 3, 1, 1), nn.BatchNorm2d(48), nn.ReLU(),
                                 nn.Conv2d(48, 48, 3, 1, 1, groups=48), nn.BatchNorm2d(48), nn.ReLU())
        self.head = LinearHead(48)

    def forward(self, x):
        return self.head(self.net(x))


MMRAZOR_TEST_MODELS = [SingleLineModel, ExpandLineModel, ResBlock, ConcatModel, AddCatModel, GroupWiseConvModel,
                       Xmodel, MultipleUseModel, MultiBindModel, DwConvModel]


# ------------------------------------------------------------------------------------------ mmcls-style classifiers
class ImageClassifier(nn.Module):
    """mmcls's layout: ``backbone`` (feature map), ``neck`` (global average pool), ``head.fc`` (logits)."""

    def __init__(self, backbone: nn.Module, width: int, num_classes: int = 1000):
        super().__init__()
        self.backbone = backbone
        self.neck = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Module()
        self.head.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head.fc(self.neck(self.backbone(x)).flatten(1))


class _ResNetBackbone(nn.Module):
    """torchvision's ResNet up to layer4: module names as mmcls's ResNet (conv1, bn1, layer1.0.conv1, ...)."""

    def __init__(self, depth: int):
        super().__init__()
        full = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(full, name))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@MODELS.register_module()
def MMClsResNet(depth: int = 34, num_classes: int = 1000) -> nn.Module:
    """An mmcls ``ImageClassifier`` with a ``ResNet`` backbone of ``depth`` 18 / 34 / 50."""
    return ImageClassifier(_ResNetBackbone(depth), 512 if depth < 50 else 2048, num_classes)


class ConvModule(nn.Sequential):
    """mmcv's ConvModule: ``conv`` (no bias), ``bn``, ``activate`` (ReLU6, or none)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        if act:
            self.activate = nn.ReLU6()


class InvertedResidual(nn.Module):
    """mmcls's MobileNetV2 block: ``conv`` = [expand 1x1 (when expand_ratio != 1)], depthwise 3x3, project 1x1."""

    def __init__(self, in_channels, out_channels, stride, expand_ratio):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers = [ConvModule(in_channels, hidden, 1)] if expand_ratio != 1 else []
        layers += [ConvModule(hidden, hidden, 3, stride, groups=hidden), ConvModule(hidden, out_channels, 1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _divisible(channels: float, divisor: int = 8) -> int:
    """mmcls's make_divisible for widths: nearest multiple of 8, never below 90 % of the asked width."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class _MobileNetV2Backbone(nn.Module):
    """mmcls's MobileNetV2: conv1, layer1..layer7, conv2 (1280 channels, ``1280 * widen_factor`` above 1)."""

    # expand ratio, channels, blocks, stride
    ARCH = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1)]

    def __init__(self, widen_factor: float = 1.0):
        super().__init__()
        in_channels = _divisible(32 * widen_factor)
        self.conv1 = ConvModule(3, in_channels, 3, stride=2)
        for index, (expand, channels, blocks, stride) in enumerate(self.ARCH, 1):
            channels = _divisible(channels * widen_factor)
            layer = []
            for block in range(blocks):
                layer.append(InvertedResidual(in_channels, channels, stride if block == 0 else 1, expand))
                in_channels = channels
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.out_channels = int(1280 * widen_factor) if widen_factor > 1.0 else 1280
        self.conv2 = ConvModule(in_channels, self.out_channels, 1)

    def forward(self, x):
        x = self.conv1(x)
        for index in range(1, len(self.ARCH) + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.conv2(x)


@MODELS.register_module()
def MMClsMobileNetV2(num_classes: int = 1000, widen_factor: float = 1.0) -> nn.Module:
    """An mmcls ``ImageClassifier`` with a ``MobileNetV2`` backbone."""
    backbone = _MobileNetV2Backbone(widen_factor)
    return ImageClassifier(backbone, backbone.out_channels, num_classes)
