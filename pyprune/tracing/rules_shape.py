"""Rules for ops that move, slice or join the channel dim: cat, permute / transpose, view / reshape / flatten,
split / chunk, unbind and indexing. A reshape that splits the channel dim into ``(heads, head_dim)`` (or ``(parts,
heads, head_dim)``) gives a group of heads (:mod:`.heads`); a segment cut inside a flattened channel, or any other
split of the channel dim, cannot be mapped and fixes its groups."""
import math
from typing import Optional, Sequence, Union

import torch
import torch.fx

from .channel_space import ChannelSpace, PartedSpace, merge_adjacent, slice_space
from .channel_tensors import fix_channel_sized_constants
from .context import PropagationContext, dim_arg, flat_nodes, op_rule, shapes
from .fused import item_at, note_sliced_part
from .heads import KV_GROUP_ATTRIBUTES, bind_count, count_attribute, named_attributes, split_heads
from .rules_elementwise import elementwise
from .sizes import ChannelSize
from .tensor_views import indexed_dim

CONCAT = ("cat", "concat", "concatenate")
RESHAPE = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "Flatten", "Unflatten", "view_as",
           "reshape_as")
PERMUTE = ("permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t")
SPLIT = ("chunk", "split", "tensor_split", "split_with_sizes")
# Ops that follow a PartedSpace (fused q / k / v heads): these rules, and ops passing a tensor on unchanged.
PARTED_RULES = PERMUTE + ("getitem", "unbind")
# dtypes of index tensors that look positions up (bool and uint8 tensors are masks: they select positions).
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8)
PARTED_PASS = ("contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "type_as", "dropout", "Identity",
               "Dropout")


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


@op_rule("stack")
def stack(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """Tensors stacked along a new dim (``torch.stack([-x[..., 1::2], x[..., ::2]], -1)``, the pairs of a rotary
    embedding): every piece carries the same channels, which keep their dim (one further on when the new dim comes
    before it). A piece without channels, or pieces with channels on different dims, cannot be followed."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    ndim = len(shapes(node))
    dim = dim_arg(node, 1, 0)
    if not isinstance(dim, int) or not isinstance(tensors, (list, tuple)):
        return ctx.unknown(node, name)
    tracked = [ctx.space(t) for t in tensors]
    if not any(tracked):
        return None
    if not all(tracked) or len({(s.dim, s.ndim) for s in tracked}) != 1 or tracked[0].ndim != ndim - 1:
        return ctx.unknown(node, name, "its pieces do not all carry channels on the same dim")
    ctx.merge_spaces(tracked, f"{ctx.where(node)} stacks different channel groups")
    space = ctx.space(tensors[0])
    dim %= ndim
    return space.with_dim(space.dim + (1 if dim <= space.dim else 0), ndim)


@op_rule(*PERMUTE)
def permute(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """Replay the op on a probe whose only non-1 dim is the channel dim (and the parts dim, size 3, of fused heads),
    and see where that dim lands."""
    parted = ctx.parted(node.args[0])
    space = ctx.space(node.args[0]) if parted is None else parted.parts[0]
    if space is None:
        return None
    probe_shape = [1] * space.ndim
    probe_shape[space.dim] = 2
    if parted is not None:
        probe_shape[parted.dim] = 3
    probe = torch.zeros(probe_shape)
    try:
        moved = getattr(probe, name)(*node.args[1:], **node.kwargs)
    except Exception:
        return ctx.unknown(node, name)
    dims = list(moved.shape)
    if parted is None:
        return space.with_dim(dims.index(2), moved.dim())
    return PartedSpace(dims.index(3), moved.dim(),
                       tuple(p.with_dim(dims.index(2), moved.dim()) for p in parted.parts))


@op_rule("unbind")
def unbind(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """Along another dim than the channels: every piece keeps them; along the parts dim of fused heads: piece i is
    part i (``q, k, v = qkv.unbind(0)``); along the channel dim: not mapped."""
    parted = ctx.parted(node.args[0])
    space = ctx.space(node.args[0]) if parted is None else parted.parts[0]
    pieces = shapes(node)
    if space is None:
        return None
    dim = dim_arg(node, 1, 0)
    if not isinstance(dim, int) or not isinstance(pieces, tuple):
        return ctx.unknown(node, name)
    dim %= space.ndim
    if parted is not None:
        if dim != parted.dim:
            return ctx.unknown(node, name, "it unbinds fused heads along another dim than their parts")
        return tuple(parted.part(i) for i in range(len(parted.parts)))
    if dim == space.dim:
        return ctx.unknown(node, name, "it unbinds the channel dim")
    return tuple(space.with_dim(space.dim - (space.dim > dim), space.ndim - 1) for _ in pieces)


@op_rule(*RESHAPE)
def reshape(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """The channel dim keeps its size (it may move), or absorbs the dims after it (flatten: each channel then spans
    ``expand`` positions; heads merged back: each head spans ``head_dim``), or splits into ``(heads, head_dim)`` /
    ``(parts, heads, head_dim)`` (:func:`.heads.split_heads`); any other reshape of the channel dim cannot be
    mapped."""
    space = ctx.space(node.args[0])
    if space is None:
        return None
    in_shape, out_shape = shapes(node.args[0]), shapes(node)
    c = space.dim
    before = math.prod(in_shape[:c])
    prefix, split_at = 1, None
    for k, size in enumerate(out_shape):
        if prefix == before:
            if size == in_shape[c]:
                return _reshaped(ctx, node, name, space.with_dim(k, len(out_shape)))
            trailing = 1
            for j in range(c + 1, len(in_shape)):
                trailing *= in_shape[j]
                if size == in_shape[c] * trailing:
                    return _reshaped(ctx, node, name, space.expanded(trailing).with_dim(k, len(out_shape)))
            if split_at is None and size != 1:
                split_at = k
        elif prefix > before:
            break
        prefix *= size
    what = f"reshape {tuple(in_shape)} -> {tuple(out_shape)} splits the channel dim"
    factors = _split_factors(out_shape, split_at, in_shape[c])
    if factors is None:
        return ctx.unknown(node, name, what)
    result = split_heads(ctx, node, space, factors, split_at, _split_entries(node, name, split_at, len(factors),
                                                                           len(out_shape)), len(out_shape))
    return ctx.unknown(node, name, f"{what} and {result}") if isinstance(result, str) else result


def _split_factors(out_shape, first: Optional[int], width: int) -> Optional[Sequence[int]]:
    """The sizes of the output dims from ``first`` on whose product is ``width`` (no 1s among them), or None."""
    if first is None:
        return None
    product, end = 1, first
    while end < len(out_shape) and product < width:
        product *= out_shape[end]
        end += 1
    factors = list(out_shape[first:end])
    return factors if product == width and len(factors) > 1 and 1 not in factors else None


def _split_entries(node: torch.fx.Node, name: str, first: int, count: int, ndim: int) -> Optional[list]:
    """What the code wrote for the output dims ``first ... first + count - 1`` (ints, -1, size nodes), or None."""
    target = _target_shape(node, name)
    if target is not None and len(target) == ndim:
        return target[first:first + count]
    if name == "unflatten":  # x.unflatten(dim, sizes): the sizes replace the channel dim
        sizes = node.args[2] if len(node.args) > 2 else node.kwargs.get("sizes")
        if isinstance(sizes, (tuple, list, torch.Size)) and len(sizes) == count:
            return list(sizes)
    return None


def _reshaped(ctx: PropagationContext, node: torch.fx.Node, name: str, space: ChannelSpace):
    """``space`` unless the target shape spells the channel width as a number (``x.reshape(n, 768, -1)``, as
    ViT does with ``self.hidden_dim``): a pruned model would still ask for the full width there, unless the number
    is an int attribute of the module whose code reshapes (it then follows the channels, see ChannelCount)."""
    target = _target_shape(node, name)
    if target is not None and len(target) == space.ndim and type(target[space.dim]) is int \
            and target[space.dim] != -1:
        value = target[space.dim]
        attribute = count_attribute(ctx, node, value)
        if attribute is not None:
            bind_count(ctx, space, attribute)
        elif not _repeated_heads(ctx, node, space):
            return ctx.unknown(node, name, f"the target shape fixes the channel count to {value}")
    return space


def _repeated_heads(ctx: PropagationContext, node: torch.fx.Node, space: ChannelSpace) -> bool:
    """``repeat_kv`` as a recorded forward sees it: ``reshape(B, kv_heads * n_rep, S, D)`` with both written as
    numbers, where ``n_rep`` is the module's ``num_key_value_groups``. The code computes ``kv_heads`` from the
    shape, but the recording cannot show it: the key / value heads are kept, ``n_rep`` follows the query heads
    (:func:`.heads.couple_grouped_heads`)."""
    if len(space.segments) != 1 or space.segments[0].expand == 1 or not ctx.whole(space.segments[0]):
        return False
    if not named_attributes(ctx, node, KV_GROUP_ATTRIBUTES, space.segments[0].expand):
        return False
    ctx.fix_space(space, f"the key / value head count is written as a number in {ctx.where(node)}")
    return True


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
    _piece_widths_follow(ctx, node, name, pieces)
    return tuple(pieces)


SPLIT_SIZE_KEYWORDS = ("chunks", "split_size_or_sections", "split_size", "split_sizes", "indices_or_sections",
                       "sections", "indices")


def _piece_widths_follow(ctx: PropagationContext, node: torch.fx.Node, name: str, pieces) -> None:
    """Pieces that are whole groups (a fused projection split into q | k | v, or gate | up) are pruned on their
    own, so a pruned model must split at their kept widths: ``chunk(n)`` does when they keep the same count (their
    groups are coupled), ``split(size)`` when ``size`` is an int attribute of the module that follows them; a size
    written as a number fixes its piece. Slices of a group are fixed by whatever reads them."""
    if not any(all(ctx.whole(seg) for seg in piece.segments) for piece in pieces):
        return
    sizes = node.args[1] if len(node.args) > 1 else next(
        (node.kwargs[k] for k in SPLIT_SIZE_KEYWORDS if k in node.kwargs), None)
    reason = f"{ctx.where(node)} splits at widths written as numbers"
    if name == "chunk" or (name == "tensor_split" and type(sizes) is int):
        if len({p.width for p in pieces}) == 1 and all(len(p.segments) == 1 for p in pieces):
            ctx.merge_spaces(list(pieces), f"{ctx.where(node)} splits into equal pieces that must stay equal")
        else:
            for piece in pieces:
                ctx.fix_space(piece, reason)
        return
    entries = [sizes] * len(pieces) if type(sizes) is int else \
        list(sizes) if name != "tensor_split" and isinstance(sizes, (list, tuple)) else [None] * len(pieces)
    for piece, entry in zip(pieces, entries):
        attribute = count_attribute(ctx, node, entry) if type(entry) is int and entry == piece.width else None
        if attribute is not None:
            bind_count(ctx, piece, attribute)  # equal pieces bind the same attribute: their groups are joined
        elif not (isinstance(entry, torch.fx.Node) and _follows_piece(ctx, entry, piece)):
            ctx.fix_space(piece, reason)


def _follows_piece(ctx: PropagationContext, entry: torch.fx.Node, piece: ChannelSpace) -> bool:
    """Whether a size node of a split is the exact width of ``piece`` (``x.split(y.shape[-1])``)."""
    value = ctx.spaces.get(entry)
    return isinstance(value, ChannelSize) and value.exact and value.factor == 1 and \
        ctx.same_channels(value.spaces[0], piece)


@op_rule("getitem")
def getitem(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """An item of a tuple value (split pieces, ``x.shape``), or basic indexing of a tensor: ints drop dims, None
    adds one, a contiguous slice of the channel dim keeps a slice of its segments."""
    source, index = node.args
    value = ctx.spaces.get(source)
    if isinstance(value, (tuple, list)):
        return value[index] if isinstance(index, (int, slice)) else None
    if isinstance(value, PartedSpace):
        return _index_parts(ctx, node, ctx.parted(source), index)
    space = ctx.space(source)
    if space is None:
        return None
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.fx.Node) for i in items):
        result = _looked_up(ctx, node, space, index)
    else:
        result = index_space(space, index)
        if not isinstance(result, str):
            note_sliced_part(ctx, node, space, index)  # a part of a fused output, cut at ints
    return ctx.unknown(node, "getitem", result) if isinstance(result, str) else result


def _looked_up(ctx: PropagationContext, node: torch.fx.Node, space: ChannelSpace, index) -> Union[ChannelSpace, str]:
    """``x[idx]`` / ``x[:, idx]`` with one integer index tensor on a dim without channels (a position lookup, e.g.
    relative-position biases computed per head): the channel dim passes whole to the output dim it becomes."""
    out, src = shapes(node), shapes(node.args[0])
    if not isinstance(out, torch.Size) or not isinstance(src, torch.Size):
        return "indexing with tensors"
    if any(ctx.space(n) is not None for n in flat_nodes(index)):
        return "indexing with a tensor that holds channels"
    for dim in range(len(out)):
        if indexed_dim(index, out, src, dim) == space.dim:
            return space.with_dim(dim, len(out))
    dim = _channel_dim_after_lookup(index, src, out, space.dim)
    if dim is not None:
        return space.with_dim(dim, len(out))
    return "indexing with tensors at the channel dim (or a mask, a sliced channel dim, ...)"


def _channel_dim_after_lookup(index, src: torch.Size, out: torch.Size, channel: int) -> Optional[int]:
    """The output dim that source dim ``channel`` becomes in ``x[index]`` for advanced indexing by several integer
    index tensors on other dims (CLIP's end-of-sequence gather ``h[torch.arange(B), ids.argmax(-1)]``, index tensors
    broadcast together and placed where numpy's rules say), or None.

    Proved by replaying the indexing on a probe ``[*src]`` whose every element is its own channel index, with zero
    index tensors of the recorded shapes and dtypes: every position of the result along that dim must hold exactly
    channel ``i`` at ``i``, so each output channel reads the whole channel dim, unmixed, whatever positions the
    real index tensors pick on the other dims. Boolean masks, tensors at the channel dim and slices written with
    tensors fail the replay and are not mapped."""
    entries = index if isinstance(index, tuple) else (index,)
    replayed = []
    for entry in entries:
        if isinstance(entry, torch.fx.Node):
            shape = shapes(entry)
            dtype = getattr(entry.meta.get("tensor_meta"), "dtype", None)
            if not isinstance(shape, torch.Size) or dtype not in INDEX_DTYPES:
                return None
            replayed.append(torch.zeros(shape, dtype=dtype))
        elif isinstance(entry, slice) and any(isinstance(getattr(entry, a), torch.fx.Node)
                                              for a in ("start", "stop", "step")):
            return None
        else:
            replayed.append(entry)
    width = src[channel]
    marks = [1] * len(src)
    marks[channel] = width
    probe = torch.arange(width).view(marks).expand(src)
    try:
        result = probe[tuple(replayed)]
    except (IndexError, RuntimeError, TypeError):
        return None
    if result.shape != out:
        return None
    for dim, size in enumerate(out):
        along = [1] * len(out)
        along[dim] = size
        if size == width and torch.equal(result, torch.arange(width).view(along).expand(out)):
            return dim
    return None


def _index_parts(ctx: PropagationContext, node: torch.fx.Node, parted: PartedSpace, index):
    """``qkv[0]``: an int at the parts dim picks that part; indexing that keeps the parts dim whole moves it."""
    item = item_at(index, parted.ndim, parted.dim)
    if type(item) is int:
        result = index_space(parted.parts[item % len(parted.parts)], index)
    elif item == slice(None):
        marker = index_space(ChannelSpace(parted.dim, parted.ndim, ()), index)  # where the parts dim goes
        moved = [index_space(p, index) for p in parted.parts]
        result = next((m for m in [marker] + moved if isinstance(m, str)), None) or \
            PartedSpace(marker.dim, marker.ndim, tuple(moved))
    else:
        result = "it slices fused heads along their parts"
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
