"""Rules for ops that move, slice or join the channel dim: cat, permute / transpose, view / reshape / flatten,
split / chunk and indexing. A segment cut inside a flattened channel, or a channel dim split by a reshape, cannot be
mapped and fixes its groups."""
import math
from typing import Optional, Union

import torch
import torch.fx

from .channel_space import ChannelSpace, merge_adjacent, slice_space
from .channel_tensors import count_attribute, fix_channel_sized_constants
from .context import PropagationContext, dim_arg, op_rule, shapes
from .rules_elementwise import elementwise
from .spec import ChannelRef

CONCAT = ("cat", "concat", "concatenate")
RESHAPE = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "Flatten", "Unflatten", "view_as",
           "reshape_as")
PERMUTE = ("permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t")
SPLIT = ("chunk", "split", "tensor_split", "split_with_sizes")


@op_rule(*CONCAT)
def concat(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """Along the channel dim: the pieces' segments follow each other. Along another dim: the channels must agree."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    ndim = len(shapes(node))
    dim = dim_arg(node, 1, 0)
    if not isinstance(dim, int):
        return ctx.unknown(node, name)
    dim %= ndim
    tracked = [ctx.space(t) for t in tensors]
    if not any(tracked):
        return None
    if all(s is None or s.dim != dim for s in tracked):
        return elementwise(ctx, node, name) if all(tracked) else _cat_other_dim(ctx, node, tracked)
    segments = []
    for t, space in zip(tensors, tracked):
        if space is None:  # an untracked piece (e.g. a constant) joins as a fixed group of its own
            space = ctx.new_space(shapes(t)[dim], dim, ndim, f"constant concatenated at {node.name}")
        elif space.dim != dim:
            return ctx.unknown(node, name, "pieces carry channels on different dims")
        segments += space.segments
    return ChannelSpace(dim, ndim, merge_adjacent(segments))


def _cat_other_dim(ctx: PropagationContext, node: torch.fx.Node, tracked):
    """Some pieces untracked (ViT's class token before the patch tokens): they may join as channel tensors."""
    present = [s for s in tracked if s is not None]
    ndim = len(shapes(node))
    fix_channel_sized_constants(ctx, node, ndim, present, bindable=True)
    ctx.merge_spaces(present, f"{ctx.where(node)} concatenates different channel groups")
    return present[0].with_dim(present[0].dim, ndim)


@op_rule(*PERMUTE)
def permute(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """Replay the op on a probe whose only non-1 dim is the channel dim, and see where that dim lands."""
    space = ctx.space(node.args[0])
    if space is None:
        return None
    probe_shape = [1] * space.ndim
    probe_shape[space.dim] = 2
    probe = torch.zeros(probe_shape)
    try:
        moved = getattr(probe, name)(*node.args[1:], **node.kwargs)
    except Exception:
        return ctx.unknown(node, name)
    return space.with_dim(list(moved.shape).index(2), moved.dim())


@op_rule(*RESHAPE)
def reshape(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """The channel dim keeps its size (it may move), or absorbs the dims after it (flatten: each channel then spans
    ``expand`` positions); a reshape that splits the channel dim cannot be mapped."""
    space = ctx.space(node.args[0])
    if space is None:
        return None
    in_shape, out_shape = shapes(node.args[0]), shapes(node)
    c = space.dim
    before = math.prod(in_shape[:c])
    prefix = 1
    for k, size in enumerate(out_shape):
        if prefix == before:
            if size == in_shape[c]:
                return _reshaped(ctx, node, name, space.with_dim(k, len(out_shape)))
            trailing = 1
            for j in range(c + 1, len(in_shape)):
                trailing *= in_shape[j]
                if size == in_shape[c] * trailing:
                    return _reshaped(ctx, node, name, space.expanded(trailing).with_dim(k, len(out_shape)))
        elif prefix > before:
            break
        prefix *= size
    return ctx.unknown(node, name, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} splits the channel dim")


def _reshaped(ctx: PropagationContext, node: torch.fx.Node, name: str, space: ChannelSpace):
    """``space`` unless the target shape spells the channel width as a number (``x.reshape(n, 768, -1)``, as
    ViT does with ``self.hidden_dim``): a pruned model would still ask for the full width there."""
    target = _target_shape(node, name)
    if target is not None and len(target) == space.ndim and isinstance(target[space.dim], int) \
            and target[space.dim] != -1:
        attribute = count_attribute(ctx.model, node, target[space.dim])
        if attribute is None or len(space.segments) != 1 or not ctx.whole(space.segments[0]) or \
                space.segments[0].expand != 1:
            return ctx.unknown(node, name, f"the target shape fixes the channel count to {target[space.dim]}")
        # the number is an int attribute of the module whose code reshapes: it becomes the active count
        ctx.table.add_ref(space.segments[0].gid, ChannelRef(attribute, 0, target[space.dim], True))
    return space


def _target_shape(node: torch.fx.Node, name: str) -> Optional[list]:
    """The explicit target shape of a view / reshape (ints, -1 or size nodes); None for ops that take none."""
    if name not in ("view", "reshape"):
        return None
    sizes = node.args[1:]  # x.view(n, c, -1), torch.reshape(x, (n, c, -1)), Tensor.view(x, n, c, -1) (recorded)
    if not sizes:
        sizes = (node.kwargs.get("shape", node.kwargs.get("size")),)
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = sizes[0]
    return list(sizes) if all(s is not None for s in sizes) else None


@op_rule(*SPLIT)
def split(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """Along the channel dim: each piece holds a slice of the segments. Along another dim: every piece keeps all."""
    space = ctx.space(node.args[0])
    pieces_shapes = shapes(node)
    if space is None:
        return None
    if not isinstance(pieces_shapes, tuple):
        return ctx.unknown(node, name)
    dim = dim_arg(node, 2, 0)
    if not isinstance(dim, int):
        return ctx.unknown(node, name)
    dim %= space.ndim
    if dim != space.dim:
        return tuple(space for _ in pieces_shapes)
    pieces, offset = [], 0
    for shape in pieces_shapes:
        segments = slice_space(space, offset, offset + shape[dim])
        if segments is None:
            return ctx.unknown(node, name, "split inside a flattened channel")
        pieces.append(ChannelSpace(dim, space.ndim, segments))
        offset += shape[dim]
    return tuple(pieces)


@op_rule("getitem")
def getitem(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """An item of a tuple value (split pieces, ``x.shape``), or basic indexing of a tensor: ints drop dims, None
    adds one, a contiguous slice of the channel dim keeps a slice of its segments."""
    source, index = node.args
    value = ctx.spaces.get(source)
    if isinstance(value, (tuple, list)):
        return value[index] if isinstance(index, (int, slice)) else None
    space = ctx.space(source)
    if space is None:
        return None
    result = index_space(space, index)
    return ctx.unknown(node, "getitem", result) if isinstance(result, str) else result


def index_space(space: ChannelSpace, index) -> Union[ChannelSpace, str]:
    """The channel space of ``x[index]`` for ``x`` holding ``space``, or why it cannot be mapped (a str).

    Basic indexing only: ints drop dims, None adds one, ``...`` stands for the dims not named; at the channel dim a
    contiguous slice keeps a slice of the segments."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, bool) for i in items):
        return "indexing with a bool"
    if any(isinstance(i, torch.fx.Node) or not isinstance(i, (int, slice, type(None), type(Ellipsis)))
           for i in items) or any(isinstance(getattr(i, a, None), torch.fx.Node) for i in items
                                  if isinstance(i, slice) for a in ("start", "stop", "step")):
        return "indexing with tensors"
    consumed = sum(1 for i in items if isinstance(i, (int, slice)))
    expanded = []
    for i in items:
        expanded += [slice(None)] * (space.ndim - consumed) if i is Ellipsis else [i]
    out_ndim = space.ndim - sum(1 for i in items if isinstance(i, int)) + sum(1 for i in items if i is None)
    in_dim = out_dim = 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if in_dim == space.dim:
            return _index_channel_dim(space, i, out_dim, out_ndim)
        in_dim += 1
        out_dim += 0 if isinstance(i, int) else 1
    return space.with_dim(out_dim + space.dim - in_dim, out_ndim)


def _index_channel_dim(space: ChannelSpace, index, out_dim: int, out_ndim: int) -> Union[ChannelSpace, str]:
    """``x[..., index, ...]`` with ``index`` at the channel dim (which lands on ``out_dim``)."""
    if isinstance(index, int):
        return "selects single channels"
    lo, hi, step = index.indices(space.width)
    if step != 1:
        return "strided channel slice"
    if (lo, hi) == (0, space.width):
        return space.with_dim(out_dim, out_ndim)
    segments = slice_space(space, lo, hi)
    if segments is None:
        return "slice inside a flattened channel"
    return ChannelSpace(out_dim, out_ndim, segments)
