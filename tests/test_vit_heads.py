"""Vision-transformer attention pruned by whole heads where per-head tensors are looked up by position: a
relative-position bias computed per head (an MLP over coordinates, looked up with an index buffer) and bias tables
looked up along their positions (``[heads, R]`` as LeViT, ``[R, heads]`` as Swin / BEiT), in a hand-written block
and in timm's Swin built tiny.
Every check compares the dynamic model at a subnet with its export (atol 1e-5, float32)."""
import random

import pytest
import torch
from torch import nn

from pyprune.mutators import ChannelMutator
from pyprune.tracing import PruningTraceWarning, trace_channel_units

HEADS, HEAD_DIM, SIDE = 4, 8, 3  # a 3 x 3 grid of tokens


def relative_index(side: int) -> torch.Tensor:
    """``[side**2, side**2]`` long: the index of each token pair's relative offset in a ``(2 side - 1)**2`` table."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :] + side - 1  # [2, N, N], each in [0, 2 side - 2]
    return rel[0] * (2 * side - 1) + rel[1]


class RelPosAttention(nn.Module):
    """Attention whose logits get a per-head bias computed from relative coordinates (``mlp: [R, 2] -> [R, heads]``)
    and looked up per token pair (``bias[index.view(-1)].view(N, N, -1).permute(2, 0, 1)``); with ``lookup``, a
    table ``[heads, R]`` looked up along its positions (``table[:, index]``) is added too."""

    def __init__(self, dim=32, num_heads=HEADS, lookup=False, index_from_channels=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, HEAD_DIM
        self.qkv, self.proj = nn.Linear(dim, 3 * num_heads * HEAD_DIM), nn.Linear(num_heads * HEAD_DIM, dim)
        offsets = torch.stack(torch.meshgrid(torch.arange(2 * SIDE - 1.0), torch.arange(2 * SIDE - 1.0),
                                             indexing="ij")).flatten(1).T  # [R, 2]
        self.register_buffer("coords", offsets)
        self.register_buffer("index", relative_index(SIDE))
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, num_heads))
        self.table = nn.Parameter(torch.randn(num_heads, offsets.shape[0])) if lookup else None
        self.index_from_channels = index_from_channels
        self.register_buffer("head_order", torch.arange(num_heads).flip(0))

    def forward(self, x):  # x: [B, N, dim]
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5  # [B, heads, N, N]
        bias = self.mlp(self.coords)  # [R, heads]
        if self.index_from_channels:  # a lookup along the heads dim itself: not a per-head bias
            bias = bias[:, self.head_order]
        attn = attn + bias[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        if self.table is not None:
            attn = attn + self.table[:, self.index]
        out = attn.softmax(-1) @ v  # [B, heads, N, head_dim]
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Net(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.embed = nn.Linear(3, 32)
        self.attn = RelPosAttention(**kwargs)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.attn(h)).mean(1)


def prepared(model, demo, ratio=0.5):
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=demo))
    mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(ratio)
    return mutator


def heads_unit(mutator, layer):
    return next(u for u in mutator.units if any(r.name == layer and r.expand == HEAD_DIM for r in u.output_related))


def assert_export_equals_dynamic(model, mutator, x, atol=1e-5):
    model.eval()
    with torch.no_grad():
        dynamic = model(x)
    exported = mutator.export(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), dynamic, atol=atol, rtol=0)
    return exported


@pytest.mark.parametrize("lookup", [False, True])
def test_relative_position_biases_looked_up_per_head_follow_the_heads(lookup):
    torch.manual_seed(0)
    model, x = Net(lookup=lookup).eval(), torch.randn(2, SIDE * SIDE, 3)
    mutator = prepared(model, x)
    unit = heads_unit(mutator, "attn.qkv")
    assert unit.is_mutable and unit.num_channels == HEADS
    related = {(r.name, r.param_dim) for r in unit.output_related}
    assert any(name == "attn.mlp.2" for name, _ in related)  # the bias MLP's outputs are the heads
    if lookup:
        assert ("attn.table", 0) in related
    exported = assert_export_equals_dynamic(model, mutator, x)
    assert exported.attn.mlp[2].out_features == HEADS // 2 and exported.attn.num_heads == HEADS // 2
    if lookup:
        assert exported.attn.table.shape == (HEADS // 2, (2 * SIDE - 1) ** 2)
    random.seed(1)
    mutator.set_choices(mutator.sample_choices())
    assert_export_equals_dynamic(model, mutator, x)


class WidthAttention(nn.Module):
    """timm's older attention (CaiT, XCiT, VOLO; BEiT / EVA for the output): the output is reshaped to the width
    ``C`` of the input, and with ``split="c_div_heads"`` head_dim is ``C // self.num_heads`` too."""

    def __init__(self, dim=32, num_heads=HEADS, split="minus_one"):
        super().__init__()
        self.num_heads, self.head_dim, self.split = num_heads, dim // num_heads, split
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # x: [B, N, C]
        B, N, C = x.shape
        head_dim = C // self.num_heads if self.split == "c_div_heads" else -1
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = ((q @ k.transpose(-2, -1)) * 0.3).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class WidthNet(nn.Module):
    def __init__(self, depth=2, dim=32, heads=None, **kwargs):
        super().__init__()
        heads = heads or (HEADS,) * depth
        self.embed = nn.Linear(3, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.blocks = nn.ModuleList(WidthAttention(dim, h, **kwargs) for h in heads)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        h = self.embed(x)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.head(h).mean(1)


@pytest.mark.parametrize("split", ["minus_one", "c_div_heads"])
def test_heads_sized_by_the_residual_width_are_tied_to_blocks_of_the_residual(split):
    """``reshape(B, N, C)`` (and ``C // num_heads``) with ``C`` the residual width: one unit keeps head i of every
    layer and residual channels ``[i * head_dim, (i + 1) * head_dim)``, so the widths stay equal in every subnet."""
    torch.manual_seed(0)
    model, x = WidthNet(split=split).eval(), torch.randn(2, 5, 3)
    before = sum(p.numel() for p in model.parameters())
    mutator = prepared(model, x)
    unit = next(u for u in mutator.units if any(r.name == "embed" for r in u.output_related))
    assert unit.is_mutable and unit.num_channels == HEADS
    refs = {(r.name, r.expand) for r in unit.output_related}
    assert {("embed", HEAD_DIM), ("blocks.0.qkv", HEAD_DIM), ("blocks.1.qkv", HEAD_DIM),
            ("blocks.1.proj", HEAD_DIM), ("norms.1", HEAD_DIM)} <= refs
    exported = assert_export_equals_dynamic(model, mutator, x)
    assert exported.embed.out_features == 16 and exported.blocks[1].num_heads == 2
    assert sum(p.numel() for p in exported.parameters()) / before < 0.35
    random.seed(2)
    mutator.set_choices(mutator.sample_choices())
    assert_export_equals_dynamic(model, mutator, x)


def test_layers_whose_head_sizes_do_not_nest_keep_the_residual_and_heads_fixed():
    """Residual 48 wide: 6 heads of 8, then 4 heads of 12; blocks of 8 cannot hold heads of 12."""
    torch.manual_seed(0)
    model, x = WidthNet(dim=48, heads=(6, 4)).eval(), torch.randn(2, 5, 3)
    specs = trace_channel_units(model, x)
    embed = next(s for s in specs if any(r.name == "embed" for r in s.output_related))
    assert embed.fixed and "sizes the output" in embed.reason
    mutator = prepared(model, x)  # what stays prunable still exports right
    assert_export_equals_dynamic(model, mutator, x)


def test_a_lookup_along_the_heads_dim_fixes_the_heads():
    torch.manual_seed(0)
    model, x = Net(index_from_channels=True).eval(), torch.randn(2, SIDE * SIDE, 3)
    with pytest.warns(PruningTraceWarning, match="indexing with tensors at the channel dim"):
        specs = trace_channel_units(model, x)
    heads = next(s for s in specs if any(r.name == "attn.qkv" and r.expand == HEAD_DIM for r in s.output_related))
    assert heads.fixed


@pytest.mark.slow  # 8-20 s here: timm builds and traces two Swin stages
def test_timm_swin_tiny_prunes_heads_with_its_relative_position_bias_tables():
    """timm's window attention: ``table[index.view(-1)].view(area, area, -1).permute(2, 0, 1)`` per block."""
    pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 4),
                            num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    mutator = prepared(model, x)
    for block, heads in (("layers.0.blocks.0", 2), ("layers.1.blocks.0", 4)):
        unit = next(u for u in mutator.units
                    if any(r.name == f"{block}.attn.qkv" and r.expand > 1 for r in u.output_related))
        assert unit.is_mutable and unit.num_channels == heads
        assert (f"{block}.attn.relative_position_bias_table", 1) in {(r.name, r.param_dim) for r in unit.output_related}
    exported = assert_export_equals_dynamic(model, mutator, x)
    assert exported.layers[1].blocks[0].attn.relative_position_bias_table.shape[1] == 2
    random.seed(0)
    mutator.set_choices(mutator.sample_choices())
    assert_export_equals_dynamic(model, mutator, x)


def test_timm_cait_tiny_prunes_heads_and_the_residual_stream_together():
    """CaiT: talking heads, class attention, ``C // num_heads`` head_dim, ``reshape(B, N, C)``, layer scale."""
    pytest.importorskip("timm")
    from timm.models.cait import Cait
    torch.manual_seed(0)
    model = Cait(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, depth_token_only=1,
                 num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    before = sum(p.numel() for p in model.parameters())
    mutator = prepared(model, x)
    residual = next(u for u in mutator.units if any(r.name == "patch_embed.proj" for r in u.output_related))
    names = {r.name for r in residual.output_related}
    assert residual.is_mutable and {"blocks.0.attn.qkv", "cls_token", "blocks.0.gamma_1",
                                    "blocks_token_only.0.attn.q"} <= names
    exported = assert_export_equals_dynamic(model, mutator, x)
    assert sum(p.numel() for p in exported.parameters()) / before < 0.35
    random.seed(0)
    mutator.set_choices(mutator.sample_choices())
    assert_export_equals_dynamic(model, mutator, x)


class PackedGluMlp(nn.Module):
    """A gated MLP in one layer (EVA02 / DeepSeek ViT's SwiGLU): ``a, g = fc1(x).chunk(2, -1); fc2(silu(a) * g)``."""

    def __init__(self, dim=32, hidden=48):
        super().__init__()
        self.embed, self.fc1, self.fc2, self.head = (nn.Linear(3, dim), nn.Linear(dim, 2 * hidden),
                                                     nn.Linear(hidden, dim), nn.Linear(dim, 2))

    def forward(self, x):
        h = self.embed(x)
        a, g = self.fc1(h).chunk(2, dim=-1)
        return self.head(h + self.fc2(torch.nn.functional.silu(a) * g))


def test_a_packed_gated_mlp_prunes_both_halves_with_one_selection():
    torch.manual_seed(0)
    model, x = PackedGluMlp().eval(), torch.randn(2, 5, 3)
    mutator = prepared(model, x)
    unit = next(u for u in mutator.units if any(r.name == "fc2" for r in u.input_related))
    assert unit.is_mutable and unit.num_channels == 48
    assert {(r.name, r.start, r.end) for r in unit.output_related if r.name == "fc1"} == {("fc1", 0, 48),
                                                                                          ("fc1", 48, 96)}
    exported = assert_export_equals_dynamic(model, mutator, x)
    assert exported.fc1.out_features == 48 and exported.fc2.in_features == 24
    random.seed(3)
    mutator.set_choices(mutator.sample_choices())
    assert_export_equals_dynamic(model, mutator, x)
