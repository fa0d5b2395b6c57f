"""Walk a captured graph and work out which channels are coupled.

Every tensor value gets a :class:`ChannelSpace` (or None: no prunable channels, e.g. a constant or the output of an
op we cannot map). Conv / Linear outputs start a new group; norms, activations, pooling and other shape-keeping ops
pass the space on; elementwise ops merge the groups they combine; cat / split / getitem / reshape / permute move,
slice or expand segments. Whatever we cannot map fixes the groups it touches, so no pruned shape can go wrong.
"""
import math
import operator
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.fx
from torch import nn

from ..errors import UntraceableOpError
from ..ops.attention import ATTENTION_TYPES, attention_heads
from ..ops.layernorm import is_channels_first_layer_norm
from .capture import is_prunable_layer
from .channel_space import ChannelSpace, GroupTable, Segment, merge_adjacent, slice_space
from .spec import ChannelRef, warn_untraceable

ELEMENTWISE = {"add", "iadd", "add_", "radd", "sub", "isub", "sub_", "rsub", "mul", "imul", "mul_", "rmul",
               "truediv", "itruediv", "rtruediv", "div", "div_", "maximum", "minimum", "where"}
CONCAT = {"cat", "concat", "concatenate"}
RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "Flatten", "Unflatten", "view_as",
           "reshape_as"}
PERMUTE = {"permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t"}
SPLIT = {"chunk", "split", "tensor_split", "split_with_sizes"}
REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod"}
NO_TENSOR = {"size", "dim", "numel", "getattr"}
TENSOR_PASS = {"expand", "expand_as", "to", "type", "type_as", "contiguous", "clone", "float", "half", "bfloat16",
               "detach"}  # between a channel tensor and its use: keep every dim where it is


@dataclass(frozen=True)
class ChannelSize:
    """A Python int read from a channel dim (``x.size(1)``, ``x.shape[-1]``) or computed from such ints.

    ``spaces`` are the channel spaces it depends on; ``exact`` is False once arithmetic has touched it. A pruned
    model reads the *active* width there, so a tensor shaped by it must carry that same space (``_check_sizes``).
    """
    spaces: tuple
    exact: bool = True


def _name(node: torch.fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        return type(model.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return node.target
    if node.target is operator.getitem:
        return "getitem"
    name = getattr(node.target, "__name__", str(node.target))
    # the recorded forward sees Tensor.__getitem__ / __add__ / __radd__ ...: the same ops as fx's getitem / add
    return name[2:-2] if name.startswith("__") and name.endswith("__") and len(name) > 4 else name


def _shapes(node) -> Any:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    if meta is None:
        return None
    if hasattr(meta, "shape"):  # fx's TensorMetadata is itself a NamedTuple: test for it first
        return meta.shape
    if isinstance(meta, (tuple, list)):
        return tuple(m.shape if m is not None and hasattr(m, "shape") else None for m in meta)
    return None


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


def _mentions(node: torch.fx.Node, width: int) -> bool:
    """Whether a plain int argument of ``node`` (nested in tuples / lists too) equals ``width`` (> 1)."""
    found = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), lambda v: found.append(type(v) is int and v == width) or v)
    return width > 1 and any(found)


def _is_model_tensor(model: nn.Module, path) -> bool:
    """Whether ``path`` names a parameter or buffer of ``model``."""
    for getter in (model.get_parameter, model.get_buffer):
        try:
            getter(path)
            return True
        except (AttributeError, TypeError):
            pass
    return False


def _tensor_pass_users(node: torch.fx.Node, model: nn.Module) -> List[torch.fx.Node]:
    """The first users of ``node`` past any chain of :data:`TENSOR_PASS` ops."""
    out = []
    for user in node.users:
        if _name(user, model) in TENSOR_PASS and user.args and user.args[0] is node:
            out += _tensor_pass_users(user, model)
        else:
            out.append(user)
    return out


def _flat_nodes(value) -> List[torch.fx.Node]:
    out = []
    torch.fx.node.map_arg(value, lambda n: out.append(n) or n)
    return out


class ChannelPropagation:
    """Assigns channel spaces to graph nodes and records coupled groups in a :class:`GroupTable`."""

    def __init__(self, model: nn.Module, strict: bool = False):
        self.model, self.strict = model, strict
        self.table = GroupTable()
        self.spaces: Dict[torch.fx.Node, Any] = {}
        self.notes: List[str] = []
        self.bound_tensors: Dict[str, list] = {}  # channel tensor path -> [(using node, space)]

    # ---- driving -------------------------------------------------------------------------------------------
    def run(self, graph: torch.fx.Graph) -> GroupTable:
        for node in graph.nodes:
            self.spaces[node] = self._visit(node)
            self._check_sizes(node)
        self._check_bound_tensors(graph)
        return self.table

    def _visit(self, node: torch.fx.Node):
        if node.op == "placeholder":
            shape = _shapes(node)
            if not isinstance(shape, torch.Size) or len(shape) < 2:
                return None
            return self._new_space(shape[1], 1, len(shape), "model input")
        if node.op == "get_attr":
            return None
        if node.op == "output":
            for space in self._spaces_in(node.args):
                self._fix_space(space, "model output")
            return None
        name = _name(node, self.model)
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            if is_prunable_layer(module):
                return self._layer(node, module)
            if any(True for _ in module.parameters(recurse=True)) or any(True for _ in module.buffers()):
                return self._unknown(node, name)
        if name == "getitem":
            return self._getitem(node)
        if _shapes(node) is None and node.op != "call_module":
            size = self._size_value(node, name)
            if size is not None:
                return size
        if isinstance(node.target, type) and issubclass(node.target, tuple):  # a NamedTuple of outputs
            return tuple(self.spaces.get(a) if isinstance(a, torch.fx.Node) else None for a in node.args)
        if name in NO_TENSOR or _shapes(node) is None:
            return self._no_tensor(node, name)
        if name in ELEMENTWISE:
            return self._elementwise(node, name)
        if name in CONCAT:
            return self._concat(node, name)
        if name in RESHAPE:
            return self._reshape(node, name)
        if name in PERMUTE:
            return self._permute(node, name)
        if name in SPLIT:
            return self._split(node, name)
        if name in REDUCE:
            return self._reduce(node, name)
        return self._generic(node, name)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _new_space(self, size: int, dim: int, ndim: int, fixed_reason: str = "") -> ChannelSpace:
        gid = self.table.new(size, fixed_reason)
        return ChannelSpace(dim, ndim, (Segment(gid, 0, size),))

    def _space(self, node) -> Optional[ChannelSpace]:
        value = self.spaces.get(node) if isinstance(node, torch.fx.Node) else None
        return value if isinstance(value, ChannelSpace) else None

    def _spaces_in(self, args) -> List[ChannelSpace]:
        out = []
        for n in _flat_nodes(args):
            value = self.spaces.get(n)
            if isinstance(value, ChannelSpace):
                out.append(value)
            elif isinstance(value, (tuple, list)):
                out += [v for v in value if isinstance(v, ChannelSpace)]
        return out

    def _fix_space(self, space: Optional[ChannelSpace], reason: str) -> None:
        if space is not None:
            for seg in space.segments:
                self.table.fix(seg.gid, reason)

    def _whole(self, seg: Segment) -> bool:
        return seg.start == 0 and seg.end == self.table.size[self.table.find(seg.gid)]

    def _where(self, node) -> str:
        path = node.meta.get("module_path", "")
        return f"op '{_name(node, self.model)}' (node {node.name}) in module '{path or '<top>'}'"

    def _unknown(self, node, name: str, why: str = "") -> None:
        spaces = self._spaces_in((node.args, node.kwargs))
        if not spaces:
            return None
        path = node.meta.get("module_path", "") or (node.target if node.op == "call_module" else "")
        message = (f"pyprune cannot map {self._where(node)} to channels{': ' + why if why else ''}; "
                   f"the channel groups it touches are not pruned")
        if self.strict:
            raise UntraceableOpError(f"{message}. Exclude the module with fixed=['{path or node.name}'] "
                                     f"or trace without strict=True")
        if message not in self.notes:
            self.notes.append(message)
            warn_untraceable(message)
        for space in spaces:
            self._fix_space(space, f"{name} at {path or node.name}")
        return None

    def _fix_channel_sized_constants(self, node, out_ndim: int, tracked: Sequence[ChannelSpace],
                                     bindable: bool = False) -> None:
        """An untracked operand with a channel-sized dim pins the groups, unless (``bindable``: elementwise ops and
        concatenation along another dim) it is a parameter or buffer of the model, read directly or through
        ``expand`` / ``to`` / ...: then the tensor joins the groups as a channel tensor (ConvNeXt's layer_scale)."""
        for arg in _flat_nodes((node.args, node.kwargs)):
            if self._space(arg) is not None or not isinstance(_shapes(arg), torch.Size):
                continue
            shape = _shapes(arg)
            for space in tracked:
                idx = space.dim + out_ndim - space.ndim - (out_ndim - len(shape))
                if not (0 <= idx < len(shape) and shape[idx] > 1):
                    continue
                source = self._channel_tensor_source(arg, idx) if bindable else None
                if source is None:
                    self._fix_space(space, f"channel-sized tensor {arg.name} used by {self._where(node)}")
                else:
                    self._bind_channel_tensor(node, space, *source)

    def _channel_tensor_source(self, node, dim: int):
        """(path, dim) of the parameter / buffer whose dim ``dim`` becomes ``node``'s dim ``dim``, or None."""
        ndim = len(_shapes(node))
        while node.op != "get_attr":
            source = node.args[0] if node.args else None
            if _name(node, self.model) not in TENSOR_PASS or not isinstance(source, torch.fx.Node) or \
                    not isinstance(_shapes(source), torch.Size):
                return None
            dim -= ndim - len(_shapes(source))  # expand may add leading dims
            ndim = len(_shapes(source))
            if dim < 0 or _shapes(source)[dim] != _shapes(node)[dim + len(_shapes(node)) - ndim]:
                return None  # a size-1 dim broadcast to the channel width
            node = source
        if not _is_model_tensor(self.model, node.target):
            return None  # e.g. a constant the recorded forward could not name
        return node.target, dim

    def _bind_channel_tensor(self, node, space: ChannelSpace, path: str, dim: int) -> None:
        offset = 0
        for seg in space.segments:
            if self._whole(seg):
                self.table.add_ref(seg.gid, ChannelRef(path, offset, offset + seg.width, True, seg.expand,
                                                       param_dim=dim))
            else:
                self.table.fix(seg.gid, f"only part of the group reaches channel tensor {path}")
            offset += seg.width
        self.bound_tensors.setdefault(path, []).append((node, space))

    def _check_bound_tensors(self, graph: torch.fx.Graph) -> None:
        """A channel tensor is sliced for every reader: each use must be one that bound it, and all to the same
        channels; otherwise the groups it joined are pinned."""
        for path, uses in self.bound_tensors.items():
            users = {user for reader in graph.nodes if reader.op == "get_attr" and reader.target == path
                     for user in _tensor_pass_users(reader, self.model)}
            consistent = all(self._same_channels(uses[0][1], space) for _, space in uses)
            if users <= {use for use, _ in uses} and consistent:
                continue
            for _, space in uses:
                self._fix_space(space, f"channel tensor {path} is also used in a way pyprune cannot slice")

    def _merge_spaces(self, spaces: Sequence[ChannelSpace], why: str) -> None:
        first = spaces[0]
        for other in spaces[1:]:
            if len(other.segments) == len(first.segments) and all(
                    a.width == b.width and a.expand == b.expand and self._whole(a) and self._whole(b)
                    for a, b in zip(first.segments, other.segments)):
                for a, b in zip(first.segments, other.segments):
                    self.table.union(a.gid, b.gid, why)
            elif not self._same_channels(first, other):
                self._fix_space(first, why)
                self._fix_space(other, why)

    # ---- sizes read from channel dims ----------------------------------------------------------------------
    def _size_value(self, node, name: str):
        """``x.shape`` / ``x.size()`` (a tuple with a ChannelSize at the channel dim), ``x.size(c)``, and ints
        computed from ChannelSizes; None for anything else."""
        if name in ("size", "getattr") and node.args and self._space(node.args[0]) is not None:
            space = self._space(node.args[0])
            if name == "getattr" and node.args[1:] != ("shape",):
                return None
            dim = self._dim_arg(node, 1) if name == "size" else None
            if dim is None:
                return tuple(ChannelSize((space,)) if d == space.dim else None for d in range(space.ndim))
            return ChannelSize((space,)) if isinstance(dim, int) and dim % space.ndim == space.dim else None
        sizes = self._sizes_in((node.args, node.kwargs))
        if not sizes:
            return None
        return ChannelSize(tuple(dict.fromkeys(space for size in sizes for space in size.spaces)), exact=False)

    def _sizes_in(self, args) -> List[ChannelSize]:
        out = []
        for n in _flat_nodes(args):
            value = self.spaces.get(n)
            out += [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, ChannelSize)]
        return out

    def _check_sizes(self, node) -> None:
        """A tensor op shaped by a channel width must produce exactly that channel space; otherwise the width of a
        pruned group would size another tensor (e.g. ``out.reshape(B, N, x.shape[-1])`` after attention heads), so
        both are pinned."""
        if node.op not in ("call_function", "call_method", "call_module") or _shapes(node) is None:
            return
        sizes = self._sizes_in((node.args, node.kwargs))
        if not sizes:
            return
        result = self.spaces.get(node)
        for size in sizes:
            if isinstance(result, ChannelSpace) and size.exact and self._same_channels(size.spaces[0], result):
                continue
            reason = f"its channel count sizes the output of {self._where(node)}"
            for space in size.spaces:
                self._fix_space(space, reason)
            for space in (result if isinstance(result, tuple) else (result,)):
                self._fix_space(space if isinstance(space, ChannelSpace) else None, reason)

    def _same_channels(self, a: ChannelSpace, b: ChannelSpace) -> bool:
        """Whether ``a`` and ``b`` hold the same channels in the same order (groups compared by their roots)."""
        def layout(space):
            return [(self.table.find(s.gid), s.start, s.end, s.expand) for s in space.segments]
        return layout(a) == layout(b)

    # ---- layers --------------------------------------------------------------------------------------------
    def _layer_inputs(self, node, space: Optional[ChannelSpace], want_dim: int, is_output: bool):
        """Add refs of the layer's channel ranges to the groups of ``space``; partial segments pin their group."""
        if space is None:
            return
        if space.dim != want_dim:
            self._fix_space(space, f"{node.target} reads channels on dim {space.dim}, expected {want_dim}")
            return
        offset = 0
        for seg in space.segments:
            if self._whole(seg):
                self.table.add_ref(seg.gid, ChannelRef(node.target, offset, offset + seg.width, is_output,
                                                       seg.expand))
            else:
                self.table.fix(seg.gid, f"only part of the group reaches {node.target}")
            offset += seg.width

    def _layer(self, node, module: nn.Module):
        if isinstance(module, nn.MultiheadAttention):
            return self._attention(node, module)
        if isinstance(module, ATTENTION_TYPES):  # Swin window attention: x [B, H, W, C] -> same channels
            space = self._space(node.args[0]) if node.args else None
            if not self._one_group_last(space):
                return self._unknown(node, type(module).__name__, "its input is not one whole channel group")
            self.table.constrain_groups(space.segments[0].gid, attention_heads(module))
            self._layer_inputs(node, space, space.ndim - 1, True)
            return space
        space = self._space(node.args[0]) if node.args else None
        shape = _shapes(node)
        ndim = len(shape)
        if isinstance(module, nn.Conv2d):
            return self._conv(node, module, space, ndim)
        if isinstance(module, nn.Linear):
            self._layer_inputs(node, space, ndim - 1 if space is None else space.ndim - 1, False)
            return self._output_group(node, module.out_features, ndim - 1, ndim)
        if isinstance(module, nn.LayerNorm):
            if len(module.normalized_shape) != 1:
                return self._unknown(node, "LayerNorm", "normalized over more than one dim")
            dim = 1 if is_channels_first_layer_norm(module) else ndim - 1
            self._layer_inputs(node, space, dim, True)
            return space if space is not None and space.dim == dim else None
        if isinstance(module, nn.GroupNorm) and space is not None:
            if len(space.segments) != 1 or not self._whole(space.segments[0]):
                self._fix_space(space, f"GroupNorm {node.target} spans several channel groups")
            else:
                self.table.constrain_groups(space.segments[0].gid, module.num_groups)
        self._layer_inputs(node, space, 1, True)  # batch / group norm: channels on dim 1
        return space if space is not None and space.dim == 1 else None

    def _attention(self, node, attention: nn.MultiheadAttention):
        """query / key / value and the output share one embedding space (nn.MultiheadAttention ties the q / k / v
        widths to it), kept balanced over the heads; returns (output space, None) like the module's tuple."""
        names = ("query", "key", "value")
        inputs = [node.args[i] if len(node.args) > i else node.kwargs.get(n) for i, n in enumerate(names)]
        spaces = [self._space(x) for x in inputs]
        if not attention._qkv_same_embed_dim or any(s is None for s in spaces):
            return self._unknown(node, "MultiheadAttention", "separate key / value widths or untracked inputs")
        if not all(self._one_group_last(s) for s in spaces):
            for space in spaces:
                self._fix_space(space, f"attention {node.target} reads channels that are not one whole group")
            return None
        self._merge_spaces(spaces, f"{self._where(node)} takes query / key / value of different widths")
        self.table.constrain_groups(spaces[0].segments[0].gid, attention.num_heads)
        self._layer_inputs(node, spaces[0], spaces[0].ndim - 1, True)
        return (spaces[0], None)

    def _one_group_last(self, space: Optional[ChannelSpace]) -> bool:
        """Whether ``space`` is one whole channel group on the last dim (what an attention layer can prune)."""
        return space is not None and space.dim == space.ndim - 1 and len(space.segments) == 1 and \
            self._whole(space.segments[0])

    def _conv(self, node, conv: nn.Conv2d, space: Optional[ChannelSpace], ndim: int):
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        if depthwise:  # channel i in -> channel i out: one group passes through
            self._layer_inputs(node, space, 1, False)
            self._layer_inputs(node, space, 1, True)
            return space if space is not None and space.dim == 1 else None
        if conv.groups > 1:
            if space is not None and (len(space.segments) != 1 or not self._whole(space.segments[0])
                                      or conv.groups == conv.in_channels):
                self._fix_space(space, f"grouped conv {node.target} input spans several groups")
            elif space is not None:
                self.table.constrain_groups(space.segments[0].gid, conv.groups)
            self._layer_inputs(node, space, 1, False)
            out = self._output_group(node, conv.out_channels, 1, ndim)
            self.table.constrain_groups(out.segments[0].gid, conv.groups)
            if conv.groups == conv.in_channels:  # depthwise with a channel multiplier: keep it whole
                self._fix_space(out, f"depthwise conv {node.target} with a channel multiplier")
            return out
        self._layer_inputs(node, space, 1, False)
        return self._output_group(node, conv.out_channels, 1, ndim)

    def _output_group(self, node, size: int, dim: int, ndim: int) -> ChannelSpace:
        out = self._new_space(size, dim, ndim)
        self.table.add_ref(out.segments[0].gid, ChannelRef(node.target, 0, size, True))
        return out

    # ---- functions -----------------------------------------------------------------------------------------
    def _no_tensor(self, node, name: str):
        shape = _shapes(node)
        if shape is not None and self._spaces_in((node.args, node.kwargs)):
            return self._unknown(node, name)
        return None

    def _elementwise(self, node, name: str):
        out_shape = _shapes(node)
        if not isinstance(out_shape, torch.Size):
            return self._unknown(node, name)
        ndim = len(out_shape)
        tracked = [s for s in (self._space(a) for a in _flat_nodes((node.args, node.kwargs))) if s is not None]
        if not tracked:
            return None
        self._fix_channel_sized_constants(node, ndim, tracked, bindable=True)
        dims = {s.dim + ndim - s.ndim for s in tracked}
        if len(dims) != 1:
            return self._unknown(node, name, "operands carry channels on different dims")
        dim = dims.pop()
        full = [s for s in tracked if s.width == out_shape[dim]]
        for s in tracked:
            if s.width != out_shape[dim]:  # a 1-channel map broadcast over the channels (spatial attention)
                self._fix_space(s, f"broadcast by {self._where(node)}")
        if not full:
            return None
        self._merge_spaces(full, f"{self._where(node)} couples channels of different sizes")
        return full[0].with_dim(dim, ndim)

    def _dim_arg(self, node, index: int, default=None):
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get("dim", node.kwargs.get("axis", default))

    def _concat(self, node, name: str):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        out_shape = _shapes(node)
        ndim = len(out_shape)
        dim = self._dim_arg(node, 1, 0)
        if not isinstance(dim, int):
            return self._unknown(node, name)
        dim %= ndim
        tracked = [self._space(t) for t in tensors]
        if not any(tracked):
            return None
        if all(s is None or s.dim != dim for s in tracked):  # cat along another dim: channels must agree
            return self._elementwise(node, name) if all(tracked) else self._cat_other_dim(node, tracked, dim)
        segments = []
        for t, space in zip(tensors, tracked):
            if space is None:  # an untracked piece (e.g. a constant) joins as a fixed group of its own
                space = self._new_space(_shapes(t)[dim], dim, ndim, f"constant concatenated at {node.name}")
            elif space.dim != dim:
                return self._unknown(node, name, "pieces carry channels on different dims")
            segments += space.segments
        return ChannelSpace(dim, ndim, merge_adjacent(segments))

    def _cat_other_dim(self, node, tracked, dim):
        present = [s for s in tracked if s is not None]
        ndim = len(_shapes(node))
        self._fix_channel_sized_constants(node, ndim, present, bindable=True)
        self._merge_spaces(present, f"{self._where(node)} concatenates different channel groups")
        return present[0].with_dim(present[0].dim, ndim)

    def _permute(self, node, name: str):
        space = self._space(node.args[0])
        if space is None:
            return None
        probe_shape = [1] * space.ndim
        probe_shape[space.dim] = 2
        probe = torch.zeros(probe_shape)
        extra = tuple(a for a in node.args[1:])
        try:  # replay the op on a probe whose only non-1 dim is the channel dim, and see where it lands
            moved = getattr(probe, name)(*extra, **node.kwargs)
        except Exception:
            return self._unknown(node, name)
        new_dim = list(moved.shape).index(2)
        return space.with_dim(new_dim, moved.dim())

    def _reshape(self, node, name: str):
        space = self._space(node.args[0])
        if space is None:
            return None
        in_shape, out_shape = _shapes(node.args[0]), _shapes(node)
        c = space.dim
        before = math.prod(in_shape[:c])
        prefix = 1
        for k, size in enumerate(out_shape):
            if prefix == before:
                if size == in_shape[c]:
                    return self._reshaped(node, name, space.with_dim(k, len(out_shape)))
                trailing = 1
                for j in range(c + 1, len(in_shape)):
                    trailing *= in_shape[j]
                    if size == in_shape[c] * trailing:
                        return self._reshaped(node, name, space.expanded(trailing).with_dim(k, len(out_shape)))
            elif prefix > before:
                break
            prefix *= size
        return self._unknown(node, name, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} splits the channel dim")

    def _reshaped(self, node, name: str, space: ChannelSpace):
        """``space`` unless the target shape spells the channel width as a number (``x.reshape(n, 768, -1)``, as
        ViT does with ``self.hidden_dim``): a pruned model would still ask for the full width there."""
        target = _target_shape(node, name)
        if target is not None and len(target) == space.ndim and isinstance(target[space.dim], int) \
                and target[space.dim] != -1:
            attribute = self._count_attribute(node, target[space.dim])
            if attribute is None or len(space.segments) != 1 or not self._whole(space.segments[0]) or \
                    space.segments[0].expand != 1:
                return self._unknown(node, name, f"the target shape fixes the channel count to {target[space.dim]}")
            # the number is an int attribute of the module whose code reshapes: it becomes the active count
            self.table.add_ref(space.segments[0].gid, ChannelRef(attribute, 0, target[space.dim], True))
        return space

    def _count_attribute(self, node, value: int) -> Optional[str]:
        """Path of the one public int attribute equal to ``value`` of the module whose code made ``node``."""
        path = node.meta.get("module_path", "")
        try:
            owner = self.model.get_submodule(path) if path else self.model
        except AttributeError:
            return None
        names = [a for a, v in vars(owner).items() if type(v) is int and v == value and not a.startswith("_")]
        return (f"{path}.{names[0]}" if path else names[0]) if len(names) == 1 else None

    def _split(self, node, name: str):
        space = self._space(node.args[0])
        shapes = _shapes(node)
        if space is None:
            return None
        if not isinstance(shapes, tuple):
            return self._unknown(node, name)
        dim = self._dim_arg(node, 2, 0) if name != "chunk" else self._dim_arg(node, 2, 0)
        if not isinstance(dim, int):
            return self._unknown(node, name)
        dim %= space.ndim
        if dim != space.dim:
            return tuple(space for _ in shapes)
        pieces, offset = [], 0
        for shape in shapes:
            segments = slice_space(space, offset, offset + shape[dim])
            if segments is None:
                return self._unknown(node, name, "split inside a flattened channel")
            pieces.append(ChannelSpace(dim, space.ndim, segments))
            offset += shape[dim]
        return tuple(pieces)

    def _getitem(self, node):
        source, index = node.args
        value = self.spaces.get(source)
        if isinstance(value, (tuple, list)):
            return value[index] if isinstance(index, (int, slice)) else None
        space = self._space(source)
        if space is None:
            return None
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.fx.Node) or not isinstance(i, (int, slice, type(None), type(Ellipsis)))
               for i in items) or any(isinstance(getattr(i, a, None), torch.fx.Node) for i in items
                                      if isinstance(i, slice) for a in ("start", "stop", "step")):
            return self._unknown(node, "getitem", "indexing with tensors")
        consumed = sum(1 for i in items if isinstance(i, (int, slice)))
        expanded = []
        for i in items:
            expanded += [slice(None)] * (space.ndim - consumed) if i is Ellipsis else [i]
        in_dim = out_dim = 0
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if in_dim == space.dim:
                if isinstance(i, int):
                    return self._unknown(node, "getitem", "selects single channels")
                lo, hi, step = i.indices(space.width)
                if step != 1:
                    return self._unknown(node, "getitem", "strided channel slice")
                if (lo, hi) == (0, space.width):
                    return space.with_dim(out_dim, len(_shapes(node)))
                segments = slice_space(space, lo, hi)
                if segments is None:
                    return self._unknown(node, "getitem", "slice inside a flattened channel")
                return ChannelSpace(out_dim, len(_shapes(node)), segments)
            in_dim += 1
            out_dim += 0 if isinstance(i, int) else 1
        return space.with_dim(out_dim + space.dim - in_dim, len(_shapes(node)))

    def _reduce(self, node, name: str):
        space = self._space(node.args[0])
        if space is None:
            return None
        dims = self._dim_arg(node, 1)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dims is None:
            return None
        dims = [d % space.ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if space.dim in dims:  # reduced over channels: nothing channel-shaped is left
            return None
        shift = 0 if keepdim else sum(1 for d in dims if d < space.dim)
        return space.with_dim(space.dim - shift, len(_shapes(node)))

    def _generic(self, node, name: str):
        """Ops we have no rule for: pass channels through when the op keeps the channel dim in place."""
        out_shape = _shapes(node)
        tracked = [s for s in (self._space(a) for a in _flat_nodes((node.args, node.kwargs))) if s is not None]
        if not tracked:
            return None
        if not isinstance(out_shape, torch.Size):
            return self._unknown(node, name)
        if len(tracked) > 1:
            shapes = {tuple(_shapes(a)) for a in _flat_nodes((node.args, node.kwargs)) if self._space(a)}
            if shapes == {tuple(out_shape)}:
                return self._elementwise(node, name)
            return self._unknown(node, name)
        space = tracked[0]
        if name == "layer_norm" and _mentions(node, space.width):  # F.layer_norm(x, (C,)): C stays C when pruned
            return self._unknown(node, name, f"an argument equals the channel count {space.width}")
        if name == "group_norm" and isinstance(self._dim_arg(node, 1), int) and space.dim == 1 and \
                len(space.segments) == 1 and self._whole(space.segments[0]):
            self.table.constrain_groups(space.segments[0].gid, self._dim_arg(node, 1))  # F.group_norm(x, G)
        if len(out_shape) == space.ndim and out_shape[space.dim] == space.width:
            self._fix_channel_sized_constants(node, len(out_shape), tracked)
            return space
        return self._unknown(node, name)

    # ---- user-fixed modules --------------------------------------------------------------------------------
    def fix_modules(self, graph: torch.fx.Graph, names: Iterable[str]) -> None:
        """Pin the groups entering and leaving every node created by (or calling) the named modules."""
        names = list(names)
        if not names:
            return
        for node in graph.nodes:
            paths = [node.meta.get("module_path", "")]
            if node.op == "call_module":
                paths.append(node.target)
            hit = next((n for n in names for p in paths if p == n or p.startswith(n + ".")), None)
            if hit is None:
                continue
            for space in self._spaces_in((node.args, node.kwargs)) + self._spaces_in(node):
                self._fix_space(space, f"module '{hit}' is fixed by the user")
