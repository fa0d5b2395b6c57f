"""Rules for ops that write one tensor into another: ``x[index] = value``, ``copy_``, ``index_put_``,
``scatter_`` and kin.

The propagation follows values from op to op, so a write is where channels could leave its sight: written into a
tensor it does not track (``torch.zeros(n, 256, 7, 7)`` filled level by level, as torchvision's
``MultiScaleRoIAlign`` does), the channels would reach the layers reading that tensor unseen, and a pruned group
would meet a layer still expecting every channel. So a write is mapped only where the channels stay where they
were; anything else fixes the groups written.
"""
import torch
import torch.fx

from .channel_space import ChannelSpace
from .channel_tensors import fix_channel_sized_constants
from .context import PropagationContext, dim_arg, op_rule
from .rules_shape import index_space

# out-of-place forms too: they return the destination with the values written
ALONG_DIM_WRITES = ("index_copy", "index_copy_", "index_add", "index_add_", "index_fill", "index_fill_", "scatter",
                    "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_")
MASKED_WRITES = ("index_put", "index_put_", "masked_scatter", "masked_scatter_", "put", "put_")
UNTRACKED = "writes channels into a tensor whose channels the tracer does not follow"


@op_rule("setitem")
def setitem(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """``dst[index] = value``: the value's channels must land on the same channels of ``dst``, at the same dim;
    an index that picks channels, or a destination without tracked channels, fixes the value's groups."""
    dst, index, value = (list(node.args) + [None] * 3)[:3]
    dst_space, value_space = ctx.space(dst), ctx.space(value)
    if dst_space is None:
        return ctx.unknown(node, name, UNTRACKED) if value_space is not None else None
    view = index_space(dst_space, index)
    if isinstance(view, str):
        return ctx.unknown(node, name, f"writes through an index that {view}")
    if value_space is None:
        fix_channel_sized_constants(ctx, node, view.ndim, [view])  # a channel-sized constant written in
        return None
    _couple(ctx, node, name, view, value_space)
    return None


@op_rule("copy_")
def copy_(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """``dst.copy_(src)``: ``src`` broadcast into ``dst``, which must carry the same channels."""
    dst, src = (list(node.args) + [None] * 2)[:2]
    dst_space, src_space = ctx.space(dst), ctx.space(src)
    if dst_space is None:
        return ctx.unknown(node, name, UNTRACKED) if src_space is not None else None
    if src_space is not None:
        _couple(ctx, node, name, dst_space, src_space)
    else:
        fix_channel_sized_constants(ctx, node, dst_space.ndim, [dst_space])
    return dst_space


@op_rule(*ALONG_DIM_WRITES)
def along_dim_write(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """``dst.index_add_(dim, index, src)`` and kin: along another dim than the channels, ``src`` must hold the
    channels of ``dst``; along the channel dim (channels picked by index) or into an untracked ``dst`` the groups
    are fixed."""
    dst = node.args[0] if node.args else None
    dst_space = ctx.space(dst)
    sources = [s for s in ctx.tracked(node) if s is not dst_space]
    if dst_space is None:
        return ctx.unknown(node, name, UNTRACKED) if sources else None
    dim = dim_arg(node, 1)
    if not isinstance(dim, int) or dim % dst_space.ndim == dst_space.dim:
        return ctx.unknown(node, name, "it writes at channels picked by an index")
    for source in sources:
        _couple(ctx, node, name, dst_space, source)
    return dst_space


@op_rule(*MASKED_WRITES)
def masked_write(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """``index_put_`` / ``masked_scatter_`` / ``put_``: where the values land depends on the data, so the groups
    of every tensor involved are fixed."""
    return ctx.unknown(node, name, "it writes at positions picked by data")


def _couple(ctx: PropagationContext, node: torch.fx.Node, name: str, dst: ChannelSpace, src: ChannelSpace) -> None:
    """Values of ``src`` written over ``dst`` (right-aligned broadcasting): the same channels at the same dim."""
    if src.dim - src.ndim != dst.dim - dst.ndim:
        ctx.unknown(node, name, "the written values carry channels on another dim")
        return
    ctx.merge_spaces([dst, src], f"{ctx.where(node)} writes channels of another group")
