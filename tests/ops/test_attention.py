"""Dynamic attention layers (nn.MultiheadAttention, torchvision's Swin window attention) against sliced plain
layers and their exports; selections must balance over the heads."""
import pytest
import torch
from torch import nn

import pyprune.ops as ops
from pyprune.errors import ChannelSelectionError


# ---------------------------------------------------------------------------------------------- attention
def _sliced_attention(mha: nn.MultiheadAttention, kept: torch.Tensor) -> nn.MultiheadAttention:
    """Reference: a plain nn.MultiheadAttention built from boolean-free slices of ``mha``'s tensors."""
    e, k = mha.embed_dim, kept.numel()
    rows = torch.cat([kept, kept + e, kept + 2 * e])
    ref = nn.MultiheadAttention(k, mha.num_heads, batch_first=mha.batch_first, add_bias_kv=mha.bias_k is not None)
    with torch.no_grad():
        ref.in_proj_weight.copy_(mha.in_proj_weight[rows][:, kept])
        ref.in_proj_bias.copy_(mha.in_proj_bias[rows])
        ref.out_proj.weight.copy_(mha.out_proj.weight[kept][:, kept])
        ref.out_proj.bias.copy_(mha.out_proj.bias[kept])
        if mha.bias_k is not None:
            ref.bias_k.copy_(mha.bias_k[..., kept])
            ref.bias_v.copy_(mha.bias_v[..., kept])
    return ref.eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("add_bias_kv", [False, True])
def test_attention_matches_slicing_reference_and_export(batch_first, add_bias_kv):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=add_bias_kv).eval()
    op = ops.to_dynamic(mha)
    assert isinstance(op, nn.MultiheadAttention) and isinstance(op, ops.DynamicMultiheadAttention)
    kept = torch.tensor([0, 1, 5, 7])  # two channels in each head's block of four
    op.set_out_channels(kept)
    x = torch.randn(3, 5, 4)
    out, weights = op(x, x, x)
    ref_out, ref_weights = _sliced_attention(mha, kept)(x, x, x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)
    exported = op.export().eval()
    assert type(exported) is nn.MultiheadAttention and exported.embed_dim == 4 and exported.num_heads == 2
    torch.testing.assert_close(exported(x, x, x)[0], out)


def test_attention_gradients_reach_only_kept_rows_and_columns():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    op = ops.to_dynamic(mha)
    kept = torch.tensor([0, 1, 5, 7])
    op.set_out_channels(kept)
    op(*(torch.randn(2, 3, 4),) * 3)[0].sum().backward()
    rows = torch.cat([kept, kept + 8, kept + 16])
    grad = mha.in_proj_weight.grad
    mask = torch.zeros_like(grad, dtype=torch.bool)
    mask[rows.unsqueeze(1), kept] = True
    assert torch.all(grad[~mask] == 0) and torch.any(grad[mask] != 0)


def test_attention_selection_must_balance_heads_and_separate_kv_widths_are_refused():
    op = ops.to_dynamic(nn.MultiheadAttention(8, 2))
    with pytest.raises(ChannelSelectionError, match="MultiheadAttention"):
        op.set_out_channels(torch.tensor([0, 1, 2]))  # 3 channels cannot split over 2 heads
    assert op.active_out_channels == 8
    assert ops.to_dynamic(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)) is None


@pytest.mark.parametrize("version", ["ShiftedWindowAttention", "ShiftedWindowAttentionV2"])
def test_swin_window_attention_prunes_its_embedding_and_exports_to_its_own_type(version):
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    attention = getattr(swin, version)(8, [2, 2], [1, 1], 2).eval()
    op = ops.to_dynamic(attention)
    assert isinstance(op, getattr(swin, version)) and isinstance(op, ops.DynamicChannelMixin)
    with pytest.raises(ChannelSelectionError):
        op.set_out_channels(torch.tensor([0, 1, 2]))  # 3 channels cannot split over 2 heads
    op.set_out_channels(torch.tensor([0, 2, 4, 7]))
    x = torch.randn(2, 4, 4, 4)
    out = op(x)
    exported = op.export().eval()
    assert type(exported) is getattr(swin, version) and exported.qkv.weight.shape == (12, 4)
    torch.testing.assert_close(exported(x), out)
    op.train()
    op(x).sum().backward()
    assert torch.all(attention.qkv.weight.grad[:, [1, 3, 5, 6]] == 0)
