"""Python ints read from channel dims (``x.size(1)``, ``x.shape[-1]``) and what they may size.

A pruned model reads the *active* width there, so a tensor shaped by such an int must carry that same channel
space; otherwise the width of one pruned group would size another tensor, and both groups are pinned.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch.fx

from .channel_space import ChannelSpace
from .context import PropagationContext, dim_arg, flat_nodes, shapes


@dataclass(frozen=True)
class ChannelSize:
    """A Python int read from a channel dim or computed from such ints.

    ``spaces`` are the channel spaces it depends on; ``exact`` is False once arithmetic has touched it.
    """
    spaces: tuple
    exact: bool = True


def size_value(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """The value of a node that yields no tensor: ``x.shape`` / ``x.size()`` (a tuple with a ChannelSize at the
    channel dim), ``x.size(c)``, and ints computed from ChannelSizes; None for anything else."""
    if name in ("size", "getattr") and node.args and ctx.space(node.args[0]) is not None:
        space = ctx.space(node.args[0])
        if name == "getattr" and node.args[1:] != ("shape",):
            return None
        dim = dim_arg(node, 1) if name == "size" else None
        if dim is None:
            return tuple(ChannelSize((space,)) if d == space.dim else None for d in range(space.ndim))
        return ChannelSize((space,)) if isinstance(dim, int) and dim % space.ndim == space.dim else None
    sizes = sizes_in(ctx, (node.args, node.kwargs))
    if not sizes:
        return None
    return ChannelSize(tuple(dict.fromkeys(space for size in sizes for space in size.spaces)), exact=False)


def sizes_in(ctx: PropagationContext, args) -> List[ChannelSize]:
    """Every ChannelSize among the values of the nodes in ``args`` (tuples such as ``x.shape`` included)."""
    out = []
    for n in flat_nodes(args):
        value = ctx.spaces.get(n)
        out += [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, ChannelSize)]
    return out


def check_sizes(ctx: PropagationContext, node: torch.fx.Node) -> None:
    """A tensor op shaped by a channel width must produce exactly that channel space; otherwise (e.g.
    ``out.reshape(B, N, x.shape[-1])`` after attention heads) pin both. Runs after ``node`` got its value."""
    if node.op not in ("call_function", "call_method", "call_module") or shapes(node) is None:
        return
    sizes = sizes_in(ctx, (node.args, node.kwargs))
    if not sizes:
        return
    result = ctx.spaces.get(node)
    for size in sizes:
        if isinstance(result, ChannelSpace) and size.exact and ctx.same_channels(size.spaces[0], result):
            continue
        reason = f"its channel count sizes the output of {ctx.where(node)}"
        for space in size.spaces:
            ctx.fix_space(space, reason)
        for space in (result if isinstance(result, tuple) else (result,)):
            ctx.fix_space(_as_space(space), reason)


def _as_space(value) -> Optional[ChannelSpace]:
    return value if isinstance(value, ChannelSpace) else None
