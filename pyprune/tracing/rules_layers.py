"""How each layer with a DynamicOp maps channels: one rule per layer type, keyed like ``pyprune.ops.DYNAMIC_OPS``.

A layer (``pyprune.ops.is_prunable_layer``) is an opaque ``call_module`` node in the captured graph. Conv / Linear
outputs start a new group and record which range of the layer's input channels each group covers; norms and
attention share one space between their input and output; embeddings start a group from ids. Whatever a layer
cannot take (a partial group, channels on the wrong dim) fixes the groups. Layer types of optional libraries
(GPT-2's ``Conv1D``) get their rule when the registry lists them (``pyprune.ops.registry.on_layer_types_added``).
"""
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch.fx
from torch import nn

from ..ops.attention import WINDOW_ATTENTION_OPS
from ..ops.base import DynamicChannelMixin
from ..ops.channel_norm import DynamicChannelNorm
from ..ops.layernorm import is_channels_first_layer_norm
from ..ops.registry import is_prunable_layer, layer_kind, on_layer_types_added, registered_base
from ..ops.served import has_own_forward, serving_probe
from .channel_space import ChannelSpace, Segment
from .context import PropagationContext, dim_arg, op_name, shapes
from .fused import slice_cut
from .rules_shape import SPLIT
from .spec import ChannelRef

__all__ = ["LAYER_RULES", "layer_rule", "apply_layer_rule", "is_prunable_layer"]

LayerRule = Callable[[PropagationContext, torch.fx.Node, nn.Module], object]

# torch layer type (a key of pyprune.ops.DYNAMIC_OPS) -> rule. Filled by ``@layer_rule`` below.
LAYER_RULES: Dict[type, LayerRule] = {}


def layer_rule(*types: type) -> Callable[[LayerRule], LayerRule]:
    """Register the decorated function as the rule of the layer ``types`` (subclasses map through their nearest
    registered base, as in ``pyprune.ops.registered_base``)."""
    def register(rule: LayerRule) -> LayerRule:
        taken = [t.__name__ for t in types if t in LAYER_RULES]
        if taken:
            raise ValueError(f"tracer rules for the layers {taken} already exist")
        LAYER_RULES.update(dict.fromkeys(types, rule))
        return rule
    return register


def apply_layer_rule(ctx: PropagationContext, node: torch.fx.Node, module: nn.Module):
    """The value of a layer node, by the rule of the layer's registered type (a type without one fixes its groups)."""
    rule = LAYER_RULES.get(registered_base(module))
    if rule is None:
        return ctx.unknown(node, type(module).__name__, "the tracer has no rule for this layer type")
    return rule(ctx, node, module)


# ---- helpers -------------------------------------------------------------------------------------------------
class LayerName(NamedTuple):
    """The layer a rule's refs name: its ``path``, and ``read_by``, the path of the module whose code reads the
    layer's tensors directly (``F.linear(x, self.qkv.weight)``), None when the layer is called."""
    path: str
    read_by: Optional[str] = None

    def ref(self, start: int, end: int, is_output: bool, expand: int = 1) -> ChannelRef:
        return ChannelRef(self.path, start, end, is_output, expand, read_by=self.read_by)


def layer_inputs(ctx: PropagationContext, node, space: Optional[ChannelSpace], want_dim: int, is_output: bool,
                 layer: Optional[LayerName] = None):
    """Add refs of the layer's channel ranges to the groups of ``space``; partial segments pin their group.
    ``layer``: the layer the refs name (default: the node's module, ``node.target``)."""
    layer = layer or LayerName(node.target)
    if space is None:
        return
    if space.dim != want_dim:
        ctx.fix_space(space, f"{layer.path} reads channels on dim {space.dim}, expected {want_dim}")
        return
    offset = 0
    for seg in space.segments:
        if ctx.whole(seg):
            ctx.table.add_ref(seg.gid, layer.ref(offset, offset + seg.width, is_output, seg.expand))
        else:
            ctx.table.fix(seg.gid, f"only part of the group reaches {layer.path}")
        offset += seg.width


def output_group(ctx: PropagationContext, node, size: int, dim: int, ndim: int,
                 layer: Optional[LayerName] = None) -> ChannelSpace:
    """A new group of ``size`` channels made by the layer of ``node`` (its output channels)."""
    out = ctx.new_space(size, dim, ndim)
    ctx.table.add_ref(out.segments[0].gid, (layer or LayerName(node.target)).ref(0, size, True))
    return out


def one_group_last(ctx: PropagationContext, space: Optional[ChannelSpace]) -> bool:
    """Whether ``space`` is one whole channel group on the last dim (what an attention layer can prune)."""
    return space is not None and space.dim == space.ndim - 1 and len(space.segments) == 1 and \
        ctx.whole(space.segments[0])


def _input(ctx: PropagationContext, node) -> Optional[ChannelSpace]:
    return ctx.space(node.args[0]) if node.args else None


def _passes_on(space: Optional[ChannelSpace], dim: int) -> Optional[ChannelSpace]:
    """A norm's output: the input space when it held the channels on the norm's dim, else nothing."""
    return space if space is not None and space.dim == dim else None


# ---- rules ---------------------------------------------------------------------------------------------------
@layer_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(ctx: PropagationContext, node, module: nn.Module):
    """Input channels on dim 1 read, output channels a new group; depthwise passes one group through; grouped
    convs constrain both sides to ``groups`` equal blocks."""
    space, ndim = _input(ctx, node), len(shapes(node))
    if module.groups == module.in_channels == module.out_channels:  # depthwise: channel i in -> channel i out
        layer_inputs(ctx, node, space, 1, False)
        layer_inputs(ctx, node, space, 1, True)
        return _passes_on(space, 1)
    if module.groups > 1:
        if space is not None and (len(space.segments) != 1 or not ctx.whole(space.segments[0])
                                  or module.groups == module.in_channels):
            ctx.fix_space(space, f"grouped conv {node.target} input spans several groups")
        elif space is not None:
            ctx.table.constrain_groups(space.segments[0].gid, module.groups)
        layer_inputs(ctx, node, space, 1, False)
        out = output_group(ctx, node, module.out_channels, 1, ndim)
        ctx.table.constrain_groups(out.segments[0].gid, module.groups)
        if module.groups == module.in_channels:  # depthwise with a channel multiplier: keep it whole
            ctx.fix_space(out, f"depthwise conv {node.target} with a channel multiplier")
        return out
    layer_inputs(ctx, node, space, 1, False)
    return output_group(ctx, node, module.out_channels, 1, ndim)


@layer_rule(nn.Linear)
def linear(ctx: PropagationContext, node, module: nn.Linear):
    """Features on the last dim: input read, output a new group (one per part of a fused output that every user
    cuts into parts: Phi-3's ``qkv_proj`` sliced into q | k | v)."""
    space, ndim = _input(ctx, node), len(shapes(node))
    layer_inputs(ctx, node, space, ndim - 1 if space is None else space.ndim - 1, False)
    return split_output_groups(ctx, node, module.out_features, ndim - 1, ndim)


@layer_rule(nn.LayerNorm)
def layer_norm(ctx: PropagationContext, node, module: nn.LayerNorm):
    """Normalises the last dim (dim 1 for channels-first subclasses); one normalised dim only."""
    space, ndim = _input(ctx, node), len(shapes(node))
    if len(module.normalized_shape) != 1:
        return ctx.unknown(node, "LayerNorm", "normalized over more than one dim")
    dim = _layer_norm_dim(module, ndim)
    if space is not None and space.dim != dim and space.ndim == ndim:
        return space  # over a dim without channels (q / k norm over head_dim): they pass through, the norm stays
    layer_inputs(ctx, node, space, dim, True)
    return _passes_on(space, dim)


def _layer_norm_dim(module: nn.LayerNorm, ndim: int) -> int:
    """The channel dim of a LayerNorm: last, 1 for channels-first subclasses, or the dim its own forward was found
    to normalise (a served layer)."""
    if is_channels_first_layer_norm(module):
        return 1
    if has_own_forward(module, nn.LayerNorm):
        dim = serving_probe(module).channel_dim
        if dim is not None:
            return dim % ndim
    return ndim - 1


@layer_rule(nn.GroupNorm)
def group_norm(ctx: PropagationContext, node, module: nn.GroupNorm):
    """Channels on dim 1, one whole group kept balanced over ``num_groups``."""
    space = _input(ctx, node)
    if space is not None:
        if len(space.segments) != 1 or not ctx.whole(space.segments[0]):
            ctx.fix_space(space, f"GroupNorm {node.target} spans several channel groups")
        else:
            ctx.table.constrain_groups(space.segments[0].gid, module.num_groups)
    return batch_norm(ctx, node, module)


@layer_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm(ctx: PropagationContext, node, module: nn.Module):
    """Channels on dim 1, passed through."""
    space = _input(ctx, node)
    layer_inputs(ctx, node, space, 1, True)
    return _passes_on(space, 1)


@layer_rule(nn.MultiheadAttention)
def multihead_attention(ctx: PropagationContext, node, module: nn.MultiheadAttention):
    """query / key / value and the output share one embedding space (nn.MultiheadAttention ties the q / k / v
    widths to it), kept balanced over the heads; returns (output space, None) like the module's tuple."""
    names = ("query", "key", "value")
    inputs = [node.args[i] if len(node.args) > i else node.kwargs.get(n) for i, n in enumerate(names)]
    spaces = [ctx.space(x) for x in inputs]
    if not module._qkv_same_embed_dim or any(s is None for s in spaces):
        return ctx.unknown(node, "MultiheadAttention", "separate key / value widths or untracked inputs")
    if not all(one_group_last(ctx, s) for s in spaces):
        for space in spaces:
            ctx.fix_space(space, f"attention {node.target} reads channels that are not one whole group")
        return None
    ctx.merge_spaces(spaces, f"{ctx.where(node)} takes query / key / value of different widths")
    ctx.table.constrain_groups(spaces[0].segments[0].gid, module.num_heads)
    layer_inputs(ctx, node, spaces[0], spaces[0].ndim - 1, True)
    return (spaces[0], None)


@layer_rule(*WINDOW_ATTENTION_OPS)
def window_attention(ctx: PropagationContext, node, module: nn.Module):
    """Swin window attention: x ``[B, H, W, C]`` -> the same channels, balanced over the heads."""
    space = _input(ctx, node)
    if not one_group_last(ctx, space):
        return ctx.unknown(node, type(module).__name__, "its input is not one whole channel group")
    ctx.table.constrain_groups(space.segments[0].gid, layer_kind(module).selection_groups(module))
    layer_inputs(ctx, node, space, space.ndim - 1, True)
    return space



@layer_rule(nn.Embedding)
def embedding(ctx: PropagationContext, node, module: nn.Embedding):
    """ids in, the embedding dim a new group on the last dim out. The ids carry no channels: a tracked ids tensor
    (its positions would follow a pruned group) pins its groups."""
    ids, ndim = _input(ctx, node), len(shapes(node))
    if ids is not None:
        for seg in ids.segments:
            if not ctx.table.is_fixed(seg.gid):
                ctx.table.fix(seg.gid, f"ids of embedding {node.target}")
    return output_group(ctx, node, module.embedding_dim, ndim - 1, ndim)


@layer_rule(DynamicChannelNorm)
def channel_norm(ctx: PropagationContext, node, module: nn.Module):
    """A norm recognised by structure (``*RMSNorm``, ...): normalises the channel dim its probe found (the last,
    or 1), channels passed through."""
    space, ndim = _input(ctx, node), len(shapes(node))
    found = module.__dict__.get("_served_dim") if isinstance(module, DynamicChannelMixin) else \
        serving_probe(module).channel_dim
    dim = found % ndim
    if space is not None and space.dim != dim and space.ndim == ndim:
        return space  # over a dim without channels (Qwen3's q / k RMSNorm over head_dim): the heads pass through
    layer_inputs(ctx, node, space, dim, True)
    return _passes_on(space, dim)


def transposed_linear(ctx: PropagationContext, node, module: nn.Module):
    """GPT-2's ``Conv1D``: features on the last dim, as for ``nn.Linear`` (its weight is transposed, its channels
    are not); a fused output that is only ever split (``c_attn``'s q | k | v) is one group per piece."""
    space, ndim = _input(ctx, node), len(shapes(node))
    layer_inputs(ctx, node, space, ndim - 1 if space is None else space.ndim - 1, False)
    return split_output_groups(ctx, node, layer_kind(module).channel_counts(module)[0], ndim - 1, ndim)


def split_output_groups(ctx: PropagationContext, node, size: int, dim: int, ndim: int,
                        layer: Optional[LayerName] = None, cuts: Sequence[int] = ()) -> ChannelSpace:
    """The layer's ``size`` output channels on ``dim``: one new group, or, when every user of the output splits it
    along ``dim`` (a fused projection: q | k | v in one layer, split or sliced right after, see :mod:`.fused`), one
    new group per piece, so each piece of the split is a whole group (pruned, or fixed, on its own). ``cuts``:
    more inner boundaries the output must be cut at (where the pieces of a concatenated bias meet)."""
    layer = layer or LayerName(node.target)
    cuts = sorted(set(_split_points(ctx, node, dim, ndim, size)) | {c for c in cuts if 0 < c < size})
    if not cuts:
        return output_group(ctx, node, size, dim, ndim, layer)
    segments = []
    for lo, hi in zip([0] + cuts, cuts + [size]):
        gid = ctx.table.new(hi - lo)
        ctx.table.add_ref(gid, layer.ref(lo, hi, True))
        segments.append(Segment(gid, 0, hi - lo))
    return ChannelSpace(dim, ndim, tuple(segments))


def _split_points(ctx: PropagationContext, node, dim: int, ndim: int, size: int) -> List[int]:
    """Inner boundaries of the pieces every user of ``node`` splits (or slices) it into along ``dim``; [] when a
    user does anything else with it (takes it whole) than that or reading its size."""
    cuts = set()
    for user in node.users:
        sliced = slice_cut(user, dim, ndim, size) if op_name(user, ctx.model) == "getitem" and \
            user.args[0] is node else None
        if sliced is not None:  # qkv[..., lo:hi]
            cuts.update(sliced)
            continue
        if op_name(user, ctx.model) in ("size", "dim") or (op_name(user, ctx.model) == "getattr" and
                                                           user.args[1:] == ("shape",)):
            continue  # reads a size, not the channels
        pieces = shapes(user)
        split_dim = dim_arg(user, 2, 0)
        if op_name(user, ctx.model) not in SPLIT or not user.args or user.args[0] is not node or \
                not isinstance(split_dim, int) or split_dim % ndim != dim or not isinstance(pieces, tuple) or \
                any(p is None for p in pieces):
            return []
        offset = 0
        for piece in pieces[:-1]:
            offset += piece[dim]
            cuts.add(offset)
    return sorted(c for c in cuts if 0 < c < size)


# DynamicOps of optional libraries (by module path and name, so that nothing here imports the library) -> rule
OPTIONAL_RULES: Dict[str, LayerRule] = {"pyprune.ops.hf_conv1d.DynamicConv1D": transposed_linear}


def _optional_rules(added: Dict[type, type]) -> None:
    """Give the layer types of optional libraries their rules as the registry lists them."""
    for layer_type, dynamic_type in added.items():
        rule = OPTIONAL_RULES.get(f"{dynamic_type.__module__}.{dynamic_type.__qualname__}")
        if rule is not None:
            LAYER_RULES[layer_type] = rule


on_layer_types_added(_optional_rules)
