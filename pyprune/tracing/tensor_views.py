"""Where one dim of a tensor the model's code derives from a parameter comes from: one step back through a view.

A relative-position bias table ``[num_rel, heads]`` reaches the attention logits ``[B, heads, N, N]`` as
``table[index].view(N, N, -1).permute(2, 0, 1)`` (BEiT, Swin) or ``biases[:, idxs]`` (LeViT): a lookup along
another dim, a reshape that leaves the heads dim whole, a permute. Each such op keeps the heads dim as one dim of
its source, so slicing the table along that dim at the kept heads is slicing the logits' bias at the kept heads.

:func:`source_dim` maps a dim of an op's output to the dim of its first input it is, or None when the op mixes
that dim with others, cuts it, creates it, or sizes it in a way a pruned model would not follow (a reshape must
write ``-1`` there: a literal would still be the full width after pruning).
"""
import math
from typing import Optional, Tuple

import torch
import torch.fx
from torch import nn

from .context import op_name, shapes

# Ops that keep every dim where it is (dtype / device / memory layout only).
TENSOR_PASS = {"expand", "expand_as", "to", "type", "type_as", "contiguous", "clone", "float", "half", "bfloat16",
               "detach"}
# Ops that move, keep or look up along other dims: :func:`source_dim` maps a dim through them.
VIEW_OPS = {"permute", "transpose", "swapaxes", "unsqueeze", "view", "reshape", "getitem"}


def source_dim(model: nn.Module, node: torch.fx.Node, dim: int) -> Optional[Tuple[torch.fx.Node, int]]:
    """(source node, its dim) that is dim ``dim`` of ``node``'s output, for :data:`TENSOR_PASS` and
    :data:`VIEW_OPS` ops on their first argument; None where ``dim`` is not one whole dim of the source."""
    name = op_name(node, model)
    source = node.args[0] if node.args else None
    if name not in TENSOR_PASS | VIEW_OPS or not isinstance(source, torch.fx.Node):
        return None
    out, src = shapes(node), shapes(source)
    if not isinstance(out, torch.Size) or not isinstance(src, torch.Size) or not 0 <= dim < len(out):
        return None
    if name in TENSOR_PASS:
        found = dim - (len(out) - len(src))  # expand may add leading dims
    elif name == "permute":
        order = _ints(node.args[1:] or node.kwargs.get("dims", ()))
        found = order[dim] % len(src) if order is not None and len(order) == len(out) else None
    elif name in ("transpose", "swapaxes"):
        pair = _ints(node.args[1:3])
        if pair is None or len(pair) != 2:
            return None
        a, b = (d % len(out) for d in pair)
        found = b if dim == a else a if dim == b else dim
    elif name == "unsqueeze":
        new = _ints(node.args[1:2] or (node.kwargs.get("dim"),))
        if new is None:
            return None
        new = new[0] % len(out)
        found = None if dim == new else dim - (dim > new)
    elif name in ("view", "reshape"):
        found = _reshaped_dim(node, out, src, dim)
    else:
        found = indexed_dim(node.args[1] if len(node.args) > 1 else None, out, src, dim)
    if found is None or not 0 <= found < len(src) or src[found] != out[dim]:
        return None  # a size-1 dim broadcast to the channel width, or a dim of another size
    return source, found


def _ints(values) -> Optional[tuple]:
    """``values`` (varargs or one tuple) as a tuple of ints, or None when any is not a plain int."""
    if len(values) == 1 and isinstance(values[0], (tuple, list)):
        values = values[0]
    return tuple(values) if all(type(v) is int for v in values) else None


def _reshaped_dim(node: torch.fx.Node, out: torch.Size, src: torch.Size, dim: int) -> Optional[int]:
    """The source dim a reshape leaves whole as output dim ``dim``: same size, the same number of elements
    after it, written as ``-1`` (so a narrower source reshapes to the narrower width)."""
    entries = node.args[1:]
    if len(entries) == 1 and isinstance(entries[0], (tuple, list)):
        entries = tuple(entries[0])
    if len(entries) != len(out) or not (type(entries[dim]) is int and entries[dim] == -1):
        return None
    after = math.prod(out[dim + 1:])
    for j in range(len(src)):
        if src[j] == out[dim] and math.prod(src[j + 1:]) == after:
            return j
    return None


def indexed_dim(index, out: torch.Size, src: torch.Size, dim: int) -> Optional[int]:
    """The source dim that is output dim ``dim`` of ``src[index]`` (None: none): full slices keep their dim, one integer
    index tensor (``table[idx]``, ``t[:, idx]``) replaces its dim by the index's dims; ints drop a dim, ``None`` adds
    one. Anything else (partial slices of that dim, several index tensors, ``...``, boolean masks) is not mapped."""
    entries = index if isinstance(index, tuple) else (index,)
    if sum(isinstance(e, torch.fx.Node) for e in entries) > 1 or any(e is Ellipsis for e in entries):
        return None
    position, source = 0, 0  # next output dim, next source dim
    for entry in entries:
        if entry is None:
            if position == dim:
                return None
            position += 1
        elif type(entry) is int:
            source += 1
        elif isinstance(entry, slice):
            if position == dim:
                return source if entry == slice(None) else None
            position, source = position + 1, source + 1
        elif isinstance(entry, torch.fx.Node):
            shape = shapes(entry)
            if not isinstance(shape, torch.Size) or not _integer_index(entry):
                return None
            if position <= dim < position + len(shape):
                return None
            position, source = position + len(shape), source + 1
        else:
            return None
    return source + dim - position if dim >= position else None


def _integer_index(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an integer index tensor (a boolean mask would select, not look up)."""
    dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
    return dtype in (torch.int64, torch.int32, torch.int16, torch.int8)
