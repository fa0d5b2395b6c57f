"""Python ints read from channel dims (``x.size(1)``, ``x.shape[-1]``) and what they may size.

A pruned model reads the *active* width there, so a tensor shaped by such an int must carry that same channel
space; otherwise the width of one pruned group would size another tensor, and both groups are pinned.
"""
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional

import torch.fx

from .channel_space import ChannelSpace, PartedSpace, Segment
from .context import PropagationContext, dim_arg, flat_nodes, shapes
from .traced_ints import INT_VALUE

# Arithmetic with a plain int that keeps a size proportional to its width: ``heads * n_rep``, ``C // head_dim``.
SCALING = {"mul": False, "rmul": False, "floordiv": True, "truediv": True}


@dataclass(frozen=True)
class ChannelSize:
    """A Python int read from a channel dim or computed from such ints.

    ``spaces`` are the channel spaces it depends on; ``exact`` is False once arithmetic other than scaling by a
    plain int has touched it; an exact size is ``factor`` times the width of ``spaces[0]``.
    """
    spaces: tuple
    exact: bool = True
    factor: Fraction = Fraction(1)


def size_value(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """The value of a node that yields no tensor: ``x.shape`` / ``x.size()`` (a tuple with a ChannelSize at the
    channel dim), ``x.size(c)``, shape tuples joined by ``+``, and ints computed from ChannelSizes; None for
    anything else."""
    if name in ("size", "getattr") and node.args and ctx.space(node.args[0]) is not None:
        space = ctx.space(node.args[0])
        if name == "getattr" and node.args[1:] != ("shape",):
            return None
        dim = dim_arg(node, 1) if name == "size" else None
        if dim is None:
            return tuple(ChannelSize((space,)) if d == space.dim else None for d in range(space.ndim))
        return ChannelSize((space,)) if isinstance(dim, int) and dim % space.ndim == space.dim else None
    if name == "add" and len(node.args) == 2 and not node.kwargs:  # shape tuples joined: (-1,) + x.shape[1:]
        pieces = [_tuple_value(ctx, a) for a in node.args]
        if all(p is not None for p in pieces):
            return pieces[0] + pieces[1]
    sizes = sizes_in(ctx, (node.args, node.kwargs))
    if not sizes:
        return None
    scaled = _scaled(ctx, node, name)
    if scaled is not None:
        return scaled
    return ChannelSize(tuple(dict.fromkeys(space for size in sizes for space in size.spaces)), exact=False)


def fold_plain_ints(ctx: PropagationContext, node: torch.fx.Node) -> None:
    """Write the ints of a recorded forward that read no channel dim (``B``, ``N`` of ``B, N, C = x.shape``) into
    ``node``'s arguments as the numbers they were, before its rule runs: only a ``ChannelSize`` stays a node
    (:mod:`.traced_ints`), so every rule sees what it sees in a symbolic graph, where such ints are plain too."""
    def fold(arg: torch.fx.Node):
        if INT_VALUE in arg.meta and type(arg.meta[INT_VALUE]) is int and \
                not isinstance(ctx.spaces.get(arg), ChannelSize):
            return arg.meta[INT_VALUE]
        return arg
    if any(INT_VALUE in arg.meta for arg in flat_nodes((node.args, node.kwargs))):
        node.args = torch.fx.node.map_arg(node.args, fold)
        node.kwargs = torch.fx.node.map_arg(node.kwargs, fold)


def _tuple_value(ctx: PropagationContext, value) -> Optional[tuple]:
    """The value of a shape tuple: a node's (``x.shape[1:]``), or a literal tuple's items' (None for plain ints)."""
    if isinstance(value, torch.fx.Node):
        found = ctx.spaces.get(value)
        return found if isinstance(found, tuple) else None
    if isinstance(value, tuple):
        return tuple(ctx.spaces.get(v) if isinstance(v, torch.fx.Node) else None for v in value)
    return None


def _scaled(ctx: PropagationContext, node: torch.fx.Node, name: str) -> Optional[ChannelSize]:
    """An exact size times or divided by a plain int (``C // head_dim``, ``kv_heads * n_rep``): still exact."""
    if name not in SCALING or len(node.args) != 2 or node.kwargs:
        return None
    values = [ctx.spaces.get(a) if isinstance(a, torch.fx.Node) else a for a in node.args]
    divides = SCALING[name]
    for size, other in ((values[0], values[1]), (values[1], values[0]))[:1 if divides else 2]:
        if isinstance(size, ChannelSize) and size.exact and type(other) is int and other > 0:
            return ChannelSize(size.spaces, True, size.factor / other if divides else size.factor * other)
    return None


def sizes_in(ctx: PropagationContext, args) -> List[ChannelSize]:
    """Every ChannelSize among the values of the nodes in ``args`` (tuples such as ``x.shape`` included)."""
    out = []
    for n in flat_nodes(args):
        value = ctx.spaces.get(n)
        out += [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, ChannelSize)]
    return out


def check_sizes(ctx: PropagationContext, node: torch.fx.Node) -> None:
    """A tensor op shaped by a channel width must produce exactly that channel space; otherwise (e.g.
    ``out.reshape(B, N, x.shape[-1])`` after attention heads) pin both. Runs after ``node`` got its value; a size
    that does not follow yet is checked again once every node has its value (:func:`check_unchecked_sizes`): a
    later op may still couple the two groups (Swin's attention output, viewed by the width of the residual stream
    it is added to afterwards)."""
    if node.op not in ("call_function", "call_method", "call_module") or shapes(node) is None or \
            node.meta.get("sizes_tied"):  # a head split whose head_dim is C // num_heads, tied by tie_blocks
        return
    for size in sizes_in(ctx, (node.args, node.kwargs)):
        if not _size_follows(ctx, node, size):
            ctx.unchecked_sizes.append((node, size))


def check_unchecked_sizes(ctx: PropagationContext) -> None:
    """The sizes :func:`check_sizes` left: where the result still does not follow the width that shapes it, and
    that width is not a fixed group's (a constant in every subnet: the model input's sequence length that sizes
    GPT-2's ``view(-1, seq, hidden)``), pin both."""
    for node, size in ctx.unchecked_sizes:
        if _size_follows(ctx, node, size) or _constant(ctx, size):
            continue
        reason = f"its channel count sizes the output of {ctx.where(node)}"
        for space in size.spaces:
            ctx.fix_space(space, reason)
        value = ctx.spaces.get(node)
        for space in (value if isinstance(value, tuple) else (value,)):
            ctx.fix_space(_as_space(space), reason)
    ctx.unchecked_sizes.clear()


def _size_follows(ctx: PropagationContext, node: torch.fx.Node, size: ChannelSize) -> bool:
    result = ctx.space(node)
    return result is not None and size.exact and (_follows(ctx, size, result) or _same_width(ctx, size, result) or
                                                  _tie_counts(ctx, node, size, result))


def _same_width(ctx: PropagationContext, size: ChannelSize, result: ChannelSpace) -> bool:
    """Whether ``result``'s channel dim is ``size.factor`` times the width of ``size`` in every subnet, though its
    channels come in another layout: Swin's patch merging views the concatenation of four strided slices of a
    ``C``-wide tensor by ``4 * C``. Widths are compared per range of a group: equal ranges keep equal counts, and
    each segment counts its kept channels ``expand`` times."""
    def counts(space: ChannelSpace, factor: Fraction) -> dict:
        out = {}
        for seg in ctx.table.resolve_space(space).segments:
            key = (ctx.table.find(seg.gid), seg.start, seg.end)
            out[key] = out.get(key, 0) + seg.expand * factor
        return out
    return counts(size.spaces[0], size.factor) == counts(result, Fraction(1))


def _constant(ctx: PropagationContext, size: ChannelSize) -> bool:
    """Whether every group ``size`` reads is fixed: it is then the same number in every subnet."""
    return all(ctx.table.is_fixed(seg.gid) for space in size.spaces for seg in ctx.table.resolve_space(space).segments)


def _follows(ctx: PropagationContext, size: ChannelSize, result: ChannelSpace) -> bool:
    """Whether ``result``'s channel dim is ``size.factor`` times the channels of ``size``: the same channels, each
    over ``factor`` times as many positions (``factor`` > 1: repeated, e.g. key / value heads for grouped-query
    attention; < 1: a block of channels per position, e.g. heads split off a width)."""
    source = ctx.table.resolve_space(size.spaces[0])
    segments = []
    for seg in source.segments:
        expand = seg.expand * size.factor
        if expand.denominator != 1:
            return False
        segments.append(Segment(seg.gid, seg.start, seg.end, int(expand)))
    return ctx.same_channels(ChannelSpace(source.dim, source.ndim, tuple(segments)), result)


def _tie_counts(ctx: PropagationContext, node: torch.fx.Node, size: ChannelSize, result: ChannelSpace) -> bool:
    """``out.reshape(B, N, C)`` after attention: ``C`` is read from the input (the residual stream) and ``out``
    holds the heads: :func:`tie_blocks` them. False leaves the caller to pin both."""
    return size.factor == 1 and len(size.spaces) == 1 and tie_blocks(ctx, node, size.spaces[0], result)


def tie_blocks(ctx: PropagationContext, node: torch.fx.Node, source: ChannelSpace, heads: ChannelSpace) -> bool:
    """A width read from group A (``source``, e.g. the residual stream) sizes a tensor of heads (group B,
    ``head_dim`` channels per slot): a pruned model needs as many channels of A as B keeps. This ties them one to
    one: A is cut into blocks of ``head_dim`` channels, block i in the same unit slot as head i, so every subnet
    keeps ``head_dim`` channels of A per kept head (a residual stream read this way by several attention layers
    ties their heads to the same slots). True where that holds (one whole group on each side, the same width)."""
    source, heads = ctx.table.resolve_space(source), ctx.table.resolve_space(heads)
    if len(source.segments) != 1 or len(heads.segments) != 1:
        return False
    a, b = source.segments[0], heads.segments[0]
    if b.expand < 2 or b.expand % a.expand or not (ctx.whole(a) and ctx.whole(b)) or a.width != b.width or \
            ctx.table.find(a.gid) == ctx.table.find(b.gid):
        return False
    found = ctx.table.refine(a.gid, a.start, a.end, b.expand // a.expand)  # A already in blocks: a coarser cut
    if found is None:
        return False
    ctx.table.union(found[0], b.gid, f"{ctx.where(node)} sizes its heads by the width of another group")
    return True


def _as_space(value):
    return value if isinstance(value, (ChannelSpace, PartedSpace)) else None
