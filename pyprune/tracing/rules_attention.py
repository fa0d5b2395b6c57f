"""Rules for the ops attention is made of: matmul (``q @ k.transpose(-2, -1)``, ``attn @ v``) and
``F.scaled_dot_product_attention``.

Their batch dims (the heads) act elementwise: q, k and v hold the same heads there, so their groups are coupled (or,
with fewer key / value heads, coupled as grouped-query attention: :func:`.heads.couple_grouped_heads`). Channels on
a contracted dim must be the same on both operands; SDPA's key / value sequence dim and its ``head_dim`` (which the
default scale reads) are never pruned.
"""
from typing import List, Optional

import torch
import torch.fx

from .channel_space import ChannelSpace
from .channel_tensors import fix_channel_sized_constants
from .context import PropagationContext, op_rule, shapes
from .heads import couple_grouped_heads, repeated_heads

SDPA_ARGS = ("query", "key", "value", "attn_mask")


def _arg(node: torch.fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


@op_rule("matmul", "bmm")
def matmul(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """``a @ b`` for ``a [..., n, k]``, ``b [..., k, m]``: channels on a batch dim are coupled (heads), channels on
    ``n`` (of ``a``) or ``m`` (of ``b``) pass to the output, channels on ``k`` must be the same on both sides."""
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    spaces = [ctx.space(a), ctx.space(b)]
    out = shapes(node)
    if not any(spaces):
        return None
    if not isinstance(out, torch.Size) or any(not isinstance(shapes(x), torch.Size) or len(shapes(x)) < 2
                                              for x in (a, b)):
        return ctx.unknown(node, name, "a 1-D operand")
    ndim = len(out)
    batch: List[ChannelSpace] = []
    passed: List[ChannelSpace] = []
    contracted: List[Optional[ChannelSpace]] = [None, None]
    for i, space in enumerate(spaces):
        if space is None:
            continue
        from_right = space.dim - space.ndim  # -1: last dim, -2: the one before
        if from_right == (-1 if i == 0 else -2):
            contracted[i] = space
        elif from_right == (-2 if i == 0 else -1):
            passed.append(space.with_dim(ndim + from_right, ndim))
        else:
            batch.append(space.with_dim(ndim + from_right, ndim))
    if any(contracted):
        if not all(contracted):
            return ctx.unknown(node, name, "it contracts channels with an untracked operand")
        ctx.merge_spaces(contracted, f"{ctx.where(node)} contracts different channels")
    if batch and passed or len(passed) > 1:
        return ctx.unknown(node, name, "its output would hold channels on two dims")
    if passed:
        return passed[0]
    if not batch:
        return None
    # an untracked operand with the heads' size there: a per-head parameter (batch dims are independent) follows
    # the heads; anything else pins them
    fix_channel_sized_constants(ctx, node, ndim, batch, bindable=True)
    return couple_heads(ctx, node, name, batch, enable_gqa=False)


@op_rule("scaled_dot_product_attention")
def scaled_dot_product_attention(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """``F.scaled_dot_product_attention(q [..., L, E], k [..., S, E], v [..., S, Ev])``: the heads (batch dims)
    of q, k, v and a tracked mask are coupled (grouped-query attention for ``enable_gqa=True`` or repeated key /
    value heads); channels on ``Ev`` of v pass to the output; ``E`` and the sequence dims are never pruned."""
    tensors = [_arg(node, i, n) for i, n in enumerate(SDPA_ARGS)]
    spaces = [ctx.space(t) for t in tensors]
    out = shapes(node)
    if not any(spaces):
        return None
    if not isinstance(out, torch.Size):
        return ctx.unknown(node, name)
    ndim = len(out)
    batch, result = [], None
    for i, space in enumerate(spaces):
        if space is None:
            continue
        from_right = space.dim - space.ndim
        if i == 2 and from_right == -1:
            result = space.with_dim(ndim - 1, ndim)
        elif from_right in (-1, -2):
            return ctx.unknown(node, name, "it would prune head_dim or sequence positions")
        else:
            batch.append((i, space.with_dim(ndim + from_right, ndim)))
    if batch and result is not None:
        return ctx.unknown(node, name, "its output would hold channels on two dims")
    if result is not None:
        return result
    if {i for i, _ in batch} & {0, 1, 2} != {0, 1, 2}:
        return ctx.unknown(node, name, "only some of query / key / value carry the heads")
    # a mask sized by the heads: a per-head bias table (added to each head's logits) follows them; else pinned
    fix_channel_sized_constants(ctx, node, ndim, [s for _, s in batch], bindable=True)
    enable_gqa = node.kwargs.get("enable_gqa", False) is True
    return couple_heads(ctx, node, name, [s for _, s in batch], enable_gqa)


def couple_heads(ctx: PropagationContext, node: torch.fx.Node, name: str, spaces: List[ChannelSpace],
                 enable_gqa: bool) -> Optional[ChannelSpace]:
    """Spaces on one batch dim (the heads) of an attention op, the query's first: the same heads are coupled; key /
    value heads that are fewer or repeated are grouped-query attention. Returns the output's space (the query's)."""
    query, others = spaces[0], spaces[1:]
    dims = {s.dim for s in spaces}
    if len(dims) != 1:
        return ctx.unknown(node, name, "its operands carry heads on different dims")
    same, grouped = [query], []
    for other in others:
        repeat = repeated_heads(query, other)
        if ctx.same_channels(query, other) or other.width == query.width and repeat == 1:
            same.append(other)
        elif repeat > 1 and (enable_gqa or other.width == query.width):
            grouped.append(other)
        else:
            same.append(other)  # merge_spaces below fixes what does not fit
    if len(same) > 1:
        ctx.merge_spaces(same, f"{ctx.where(node)} couples heads of different groups")
    if grouped:
        couple_grouped_heads(ctx, node, query, grouped, repeated_heads(query, grouped[0]))
    return query
