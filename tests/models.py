"""Small models that more than one test file builds (the shared test zoo).

Import them by module name (``from models import SmallNet``): pytest puts ``tests/`` on ``sys.path`` (see
tests/conftest.py). A model that only one test file uses stays in that file.
"""
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.tracing import ChannelRef, UnitSpec


# ---------------------------------------------------------------------------------------------------- layers
class ChannelsFirstLayerNorm(nn.LayerNorm):
    """torchvision's LayerNorm2d, written out: normalise dim 1 of ``[N, C, H, W]``."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


# -------------------------------------------------------------------------------- SmallNet and its hand-made units
class SmallNet(nn.Module):
    """conv-bn-relu, residual add, concat, depthwise conv, grouped conv, flatten -> linear. Input [N, 3, 8, 8]."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.dw, self.bn_dw = nn.Conv2d(10, 10, 3, padding=1, groups=10), nn.BatchNorm2d(10)
        self.conv4 = nn.Conv2d(10, 8, 1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 5)
        for bn in (self.bn0, self.bn1, self.bn2, self.bn_dw):  # non-trivial statistics for eval-mode checks
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        a = F.relu(self.bn0(self.conv0(x)))
        a = F.relu(self.bn1(self.conv1(a)) + a)
        b, c = F.relu(self.bn2(self.conv2(a))), self.conv3(a)
        d = F.relu(self.bn_dw(self.dw(torch.cat([b, c], 1))))
        e = self.gconv(self.conv4(d))
        return self.fc(self.pool(e).flatten(1))


def out_ref(name, start, end, expand=1):
    """The output channels ``[start, end)`` of layer ``name``."""
    return ChannelRef(name, start, end, True, expand)


def in_ref(name, start, end, expand=1):
    """The input channels ``[start, end)`` of layer ``name`` (``expand``: input features per channel)."""
    return ChannelRef(name, start, end, False, expand)


def small_net_specs():
    """The units a tracer finds in :class:`SmallNet` (unit names: first output ref, range, channel count)."""
    return [
        UnitSpec(3, [], [in_ref("conv0", 0, 3)], fixed=True, reason="model input"),
        UnitSpec(8, [out_ref("conv0", 0, 8), out_ref("bn0", 0, 8), out_ref("conv1", 0, 8), out_ref("bn1", 0, 8)],
                 [in_ref("bn0", 0, 8), in_ref("bn1", 0, 8), in_ref("conv1", 0, 8), in_ref("conv2", 0, 8),
                  in_ref("conv3", 0, 8)]),
        UnitSpec(6, [out_ref("conv2", 0, 6), out_ref("bn2", 0, 6), out_ref("dw", 0, 6), out_ref("bn_dw", 0, 6)],
                 [in_ref("bn2", 0, 6), in_ref("dw", 0, 6), in_ref("bn_dw", 0, 6), in_ref("conv4", 0, 6)]),
        UnitSpec(4, [out_ref("conv3", 0, 4), out_ref("dw", 6, 10), out_ref("bn_dw", 6, 10)],
                 [in_ref("dw", 6, 10), in_ref("bn_dw", 6, 10), in_ref("conv4", 6, 10)]),
        UnitSpec(8, [out_ref("conv4", 0, 8)], [in_ref("gconv", 0, 8)], groups=2),
        UnitSpec(8, [out_ref("gconv", 0, 8)], [in_ref("fc", 0, 32, expand=4)], groups=2),
        UnitSpec(5, [out_ref("fc", 0, 5)], [], fixed=True, reason="model output"),
    ]


# ------------------------------------------------------------------------------------------- token models
class TokenNet(nn.Module):
    """Patch embedding -> [class token; tokens] + position embedding -> LayerNorm -> scaled MLP residual -> head.

    Input [N, 3, 4, 4] (four 2x2 patches, so five tokens of width 8).
    """

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.class_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos_embedding = nn.Parameter(torch.randn(1, 5, 8))
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.layer_scale = nn.Parameter(torch.rand(8) + 0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embedding
        tokens = tokens + self.layer_scale * self.mlp(self.norm(tokens))
        return self.head(tokens[:, 0])


class TinyTransformer(nn.Module):
    """conv stem -> channels-first LayerNorm -> tokens -> attention and MLP residual blocks -> head.

    Input [N, 3, 8, 8]; width 8 over 2 attention heads.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.stem_norm = ChannelsFirstLayerNorm(8)
        self.norm1, self.attention = nn.LayerNorm(8), nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.stem_norm(self.stem(x)).flatten(2).transpose(1, 2)
        y = self.norm1(tokens)
        tokens = tokens + self.attention(y, y, y, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(tokens.mean(1))


class ZooNet(nn.Module):
    """Every layer kind compact mode covers: plain / grouped / depthwise conv, BatchNorm 1d / 2d, GroupNorm,
    Linear, LayerNorm and MultiheadAttention (with bias_k / bias_v). x ``[N, 3, 6, 6]`` -> logits ``[N, 10]``."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.group, self.gn = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.GroupNorm(4, 16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.proj, self.ln = nn.Linear(24, 32), nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True)
        self.fc, self.bn1d = nn.Linear(32, 20), nn.BatchNorm1d(20)
        self.head = nn.Linear(20, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.gn(self.group(x)))
        x = x + F.relu(self.bn2(self.dw(x)))
        tokens = self.ln(self.proj(self.pw(x).flatten(2).transpose(1, 2)))
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(F.relu(self.bn1d(self.fc(tokens.mean(1)))))
