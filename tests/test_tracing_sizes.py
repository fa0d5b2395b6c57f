"""What the recorded forward cannot see as code: advanced indexing that leaves the channel dim whole (CLIP's
end-of-sequence gather), and Python ints read from tensor shapes (``B, N, C = x.shape``), which the recorder keeps
as size nodes so a reshape by them follows the pruned width."""
import warnings

import pytest
import torch
from torch import nn

from pyprune.mutators import ChannelMutator
from pyprune.tracing import PruningTraceWarning

TRACERS = ["fx", "torch_function"]


def prepared(model, demo, ratio=0.5, tracer="auto"):
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=demo, tracer_type=tracer))
    mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(ratio)
    return mutator


def assert_export_equals_dynamic(model, mutator, *inputs, atol=1e-5):
    model.eval()
    with torch.no_grad():
        dynamic = model(*inputs)
    exported = mutator.export(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(*inputs), dynamic, atol=atol, rtol=0)
    return exported


def prepared_with_warnings(model, demo, tracer="auto"):
    """(mutator at ratio 0.5, the messages of the PruningTraceWarnings preparing it gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mutator = prepared(model, demo, tracer=tracer)
    return mutator, [str(w.message) for w in caught if issubclass(w.category, PruningTraceWarning)]


def unit_of(mutator, layer):
    return next(u for u in mutator.units if any(r.name == layer for r in u.output_related))


# ---- advanced indexing on other dims than the channels -------------------------------------------------------
class EndOfSequencePool(nn.Module):
    """A text tower's pooling as CLIP writes it: the hidden state of each sequence's largest token id."""

    def __init__(self, vocab=16, hidden=12, index="eos"):
        super().__init__()
        self.embed, self.index = nn.Embedding(vocab, hidden), index
        self.fc = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 3)
        self.register_buffer("channel_of_row", torch.tensor([0, 2, 1]))   # for a batch of 3
        self.register_buffer("mask", torch.rand(3, 5) > 0.5)              # over (B, T) = (3, 5)

    def forward(self, ids):
        h = self.norm(self.fc(self.embed(ids)))  # [B, T, hidden]
        rows = torch.arange(h.shape[0], device=h.device)
        if self.index == "eos":
            pooled = h[rows, ids.argmax(-1)]                  # [B, hidden]
        elif self.index == "channel":
            picked = h[rows, :, self.channel_of_row]          # [B, T]: one channel per row, not mapped
            pooled = picked[:, :1] * h[:, 0]
        else:
            pooled = h[self.mask].sum(0, keepdim=True)        # positions selected by a mask: not looked up
        return self.head(pooled)


@pytest.mark.parametrize("tracer", TRACERS)
def test_gather_on_the_batch_and_token_dims_passes_the_hidden_size_through(tracer):
    torch.manual_seed(0)
    model, ids = EndOfSequencePool().eval(), torch.randint(0, 16, (3, 5))
    mutator, messages = prepared_with_warnings(model, ids, tracer=tracer)
    # (argmax reduces the token ids, the model input's dim 1: a group that is fixed anyway)
    assert not [m for m in messages if "argmax" not in m], messages
    hidden = unit_of(mutator, "fc")
    assert hidden.is_mutable and {r.name for r in hidden.output_related} == {"fc", "norm"}
    exported = assert_export_equals_dynamic(model, mutator, ids)
    assert exported.fc.out_features == 6


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("index", ["channel", "mask"])
def test_gathers_that_pick_channels_or_mask_positions_fix_the_hidden_size(index, tracer):
    torch.manual_seed(0)
    model, ids = EndOfSequencePool(index=index).eval(), torch.randint(0, 16, (3, 5))
    with pytest.warns(PruningTraceWarning, match="getitem.*indexing with tensors at the channel dim"):
        mutator = prepared(model, ids, tracer=tracer)
    assert not unit_of(mutator, "fc").is_mutable


# ---- sizes read from tensors in a recorded forward ---------------------------------------------------------------
class ShapeReadAttention(nn.Module):
    """timm's attention as a recorded forward sees it: every size read from ``x.shape``, the head width computed
    as ``C // num_heads`` (no ``head_dim`` attribute), and a data-dependent branch fx cannot trace."""

    def __init__(self, dim=32, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class ShapeReadViT(nn.Module):
    def __init__(self, dim=32, depth=2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.ModuleList(ShapeReadAttention(dim) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # NHWC, as timm's dynamic_img_size
        B, H, W, C = x.shape
        x = x.view(B, -1, C)
        if x.abs().sum() > 0:  # data-dependent: fx cannot trace this model
            x = x * 1.0
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x).mean(1))


def test_recorded_sizes_read_from_shapes_let_heads_and_the_residual_stream_prune():
    torch.manual_seed(0)
    model, x = ShapeReadViT().eval(), torch.randn(2, 3, 16, 16)
    mutator, messages = prepared_with_warnings(model, x)
    assert any("recorded a real forward" in m for m in messages)
    assert not [m for m in messages if "recorded a real forward" not in m], messages
    # head_dim is C // num_heads with C read from the residual stream: the stream is cut into blocks of head_dim
    # channels, block i in the slot of head i, so one unit prunes heads and stream together
    unit = unit_of(mutator, "embed")
    layers = {(r.name, r.expand) for r in unit.output_related}
    assert {("embed", 8), ("blocks.0.qkv", 8), ("blocks.1.proj", 8), ("blocks.0.num_heads", 1)} <= layers
    assert unit.is_mutable and unit.current_choice == 2  # of 4 slots
    exported = assert_export_equals_dynamic(model, mutator, x)
    assert exported.embed.out_channels == 16 and exported.blocks[0].qkv.out_features == 48
    assert exported.blocks[1].num_heads == 2


def test_sizes_read_from_the_batch_or_tokens_stay_plain_numbers():
    from pyprune.tracing.capture import capture
    from pyprune.tracing.example_inputs import CallArgs
    from pyprune.tracing.propagate import propagate
    from pyprune.tracing.sizes import ChannelSize
    from pyprune.tracing.traced_ints import INT_VALUE
    model = ShapeReadViT(depth=1).eval()
    graph = capture(model, CallArgs((torch.randn(2, 3, 16, 16),), {}), "torch_function").graph
    view = next(n for n in graph.nodes if getattr(n.target, "__name__", "") == "view")
    assert all(isinstance(a, torch.fx.Node) and INT_VALUE in a.meta for a in view.args[1:] if a != -1)
    ctx = propagate(model, graph, recorded=True)
    # B became its number again; C stayed the node of the channel size it is
    batch, rest, channels = view.args[1:]
    assert batch == 2 and rest == -1 and isinstance(ctx.spaces[channels], ChannelSize)


def test_traced_ints_compute_as_ints_and_copy_as_plain_ints():
    import copy
    import pickle
    from pyprune.tracing.traced_ints import TracedInt
    made = []
    emit = lambda target, args, value: made.append((target.__name__, value)) or object()  # noqa: E731
    c = TracedInt(12, node=None, emit=emit)
    assert (c // 4, 2 * c, c - 2, -c, c % 5, c / 4) == (3, 24, 10, -12, 2, 3.0)
    assert [name for name, _ in made] == ["floordiv", "mul", "sub", "neg", "mod"]  # true division gives a float
    assert type(c / 4) is float and type(int(c)) is int and isinstance(c // 4, TracedInt)
    assert type(copy.deepcopy(c)) is int and type(pickle.loads(pickle.dumps(c))) is int
    ended = TracedInt(12, node=None, emit=lambda target, args, value: None)  # the recording is over
    assert type(ended * 2) is int and ended * 2 == 24


# ---- when a size follows its output --------------------------------------------------------------------------
class SizedBeforeCoupled(nn.Module):
    """HF Swin's and GPT-2's shapes: a branch viewed by the width of the stream it is added to only later, the
    concatenation of two strided token slices viewed by ``2 * C`` (patch merging), and a view sized by the model
    input's own length (a fixed group: the same number in every subnet)."""

    def __init__(self, vocab=16, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm, self.branch = nn.LayerNorm(dim), nn.Linear(dim, dim)
        self.merge = nn.Linear(2 * dim, 6)

    def forward(self, ids):
        x = self.embed(ids)                                   # [B, T, C]
        B, T, C = x.shape
        h = self.branch(self.norm(x)).view(B, 2, T // 2, C)   # C of the stream sizes the branch's output ...
        x = x + h.view(B, T, C)                               # ... which the add couples with the stream only now
        x = x.view((-1,) + ids.shape[1:] + (x.size(-1),))     # the input's length T sizes dim 1
        merged = torch.cat([x[:, 0::2], x[:, 1::2]], -1)      # [B, T / 2, 2C]
        return self.merge(merged.view(B, -1, 2 * C))


@pytest.mark.parametrize("tracer", TRACERS)
def test_sizes_that_follow_once_the_graph_is_walked_leave_the_stream_prunable(tracer):
    torch.manual_seed(0)
    model, ids = SizedBeforeCoupled().eval(), torch.randint(0, 16, (2, 6))
    mutator, messages = prepared_with_warnings(model, ids, tracer=tracer)
    assert not [m for m in messages if "recorded a real forward" not in m], messages
    stream = unit_of(mutator, "embed")
    assert stream.is_mutable and {r.name for r in stream.output_related} == {"embed", "norm", "branch"}
    exported = assert_export_equals_dynamic(model, mutator, ids)
    assert exported.merge.in_features == 8 and exported.branch.out_features == 4


# ---- a channel tensor through a broadcast add --------------------------------------------------------------------
class MaskedBiasAttention(nn.Module):
    """Shifted-window attention as HF Swin writes it: a per-head bias ``[1, heads, N, N]`` plus a mask constant
    along the heads (``[B, 1, N, N]``), passed to SDPA as one ``attn_mask``."""

    def __init__(self, dim=16, heads=4, tokens=6, masked=True):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))
        self.register_buffer("mask", torch.zeros(2, 1 if masked else heads, tokens, tokens).masked_fill(
            torch.rand(2, 1 if masked else heads, tokens, tokens) > 0.7, -100.0))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.unsqueeze(0) + self.mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_per_head_bias_plus_a_mask_constant_along_the_heads_follows_the_heads(tracer):
    torch.manual_seed(0)
    model, x = MaskedBiasAttention().eval(), torch.randn(2, 6, 16)
    mutator, messages = prepared_with_warnings(model, x, tracer=tracer)
    heads = unit_of(mutator, "qkv")
    assert heads.is_mutable and ("bias", 4) in {(r.name, r.end) for r in heads.output_related}
    exported = assert_export_equals_dynamic(model, mutator, x)
    assert exported.bias.shape == (2, 6, 6) and exported.num_heads == 2


def test_a_mask_that_varies_along_the_heads_fixes_them():
    torch.manual_seed(0)
    model, x = MaskedBiasAttention(masked=False).eval(), torch.randn(2, 6, 16)
    mutator, messages = prepared_with_warnings(model, x)
    assert not unit_of(mutator, "qkv").is_mutable
