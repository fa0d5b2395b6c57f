"""A fused projection cut into its parts by slicing: ``qkv[..., :q_width]``, ``qkv[..., q_width:q_width + kv]``, ...

Phi-3's ``qkv_proj`` output is sliced into query, key and value at bounds its code computes from head counts
(``self.config.num_attention_heads * self.head_dim``); a recorded forward shows them as numbers. When every user
of a layer's output cuts it along its features (by slices or ``split``), the output is one group per part
(``rules_layers.split_output_groups``), so each part becomes a head or MLP group of its own. A pruned model slices
at the kept widths only where the width of every part before a bound is counted by an int attribute that follows
it (a head count bound as a :class:`~pyprune.ops.ChannelCount`); :func:`check_slice_bounds`, run once the graph is
visited, fixes the parts a bound counts that no attribute does.
"""
from typing import Optional, Tuple

import torch.fx

from .channel_space import ChannelSpace, slice_space
from .context import PropagationContext


def item_at(index, ndim: int, dim: int):
    """The index item that applies to dim ``dim`` of an ``ndim``-dim tensor (``slice(None)`` when none does)."""
    items = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    position = 0
    for i in items:
        if i is None:
            continue
        if i is Ellipsis:
            position += ndim - consumed
            if position > dim:
                return slice(None)
            continue
        if position == dim:
            return i
        position += 1
    return slice(None)


def channel_slice(index, ndim: int, dim: int) -> Optional[slice]:
    """The slice ``x[index]`` takes of dim ``dim`` when that is all it does (int or None bounds, step 1; every other
    item ``:`` or ``...``), else None."""
    items = index if isinstance(index, tuple) else (index,)
    if any(not (i is Ellipsis or isinstance(i, slice)) for i in items):
        return None
    found = item_at(index, ndim, dim)
    others = [i for i in items if i is not Ellipsis and i is not found]
    if not isinstance(found, slice) or found == slice(None) or any(i != slice(None) for i in others) or \
            any(b is not None and type(b) is not int for b in (found.start, found.stop, found.step)) or \
            found.step not in (None, 1):
        return None
    return found


def slice_cut(node: torch.fx.Node, dim: int, ndim: int, size: int) -> Optional[Tuple[int, int]]:
    """``(lo, hi)`` of the channel slice that getitem ``node`` takes of a ``size``-wide dim ``dim``, or None."""
    if len(node.args) != 2:
        return None
    found = channel_slice(node.args[1], ndim, dim)
    if found is None:
        return None
    lo, hi, _ = found.indices(size)
    return (lo, hi) if lo < hi else None


def note_sliced_part(ctx: PropagationContext, node: torch.fx.Node, space: ChannelSpace, index) -> None:
    """``node`` slices whole groups out of ``space`` (the parts of a fused output) at ints: remember which groups
    its bounds count (those before its end; before its start when the end is left open) for
    :func:`check_slice_bounds`, and that the result is such a part (its head counts may live in a config)."""
    found = channel_slice(index, space.ndim, space.dim)
    if found is None or len(space.segments) < 2:
        return
    lo, hi, _ = found.indices(space.width)
    counted = slice_space(space, 0, lo if found.stop is None else hi)
    part = slice_space(space, lo, hi)
    if counted is None or part is None or not all(ctx.whole(s) for s in counted + part):
        return
    ctx.sliced_parts.append((node, ChannelSpace(space.dim, space.ndim, counted)))
    ctx.fused_parts.update(ctx.table.find(s.gid) for s in part)


def is_fused_part(ctx: PropagationContext, space: ChannelSpace) -> bool:
    """Whether ``space`` is a part :func:`note_sliced_part` saw sliced out of a fused output."""
    return any(ctx.table.find(s.gid) in {ctx.table.find(g) for g in ctx.fused_parts} for s in space.segments)


def check_slice_bounds(ctx: PropagationContext) -> None:
    """Every group a slice bound counts must carry an int attribute that follows it (a pruned model computes the
    bound from it); otherwise the bound is a number a pruned model keeps, and the group is fixed."""
    for node, counted in ctx.sliced_parts:
        for seg in ctx.table.resolve_space(counted).segments:
            if not ctx.table.ref_names(seg.gid) & ctx.count_paths:
                ctx.table.fix(seg.gid, f"{ctx.where(node)} slices a fused output at a bound written as a number "
                                       f"that no int attribute of the module counts")
