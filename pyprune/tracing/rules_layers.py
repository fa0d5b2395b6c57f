"""How each layer with a DynamicOp maps channels: one rule per layer type, keyed like ``pyprune.ops.DYNAMIC_OPS``.

A layer (``pyprune.ops.is_prunable_layer``) is an opaque ``call_module`` node in the captured graph. Conv / Linear
outputs start a new group and record which range of the layer's input channels each group covers; norms and
attention share one space between their input and output. Whatever a layer cannot take (a partial group, channels
on the wrong dim) fixes the groups.
"""
from typing import Callable, Dict, Optional

import torch.fx
from torch import nn

from ..ops.attention import WINDOW_ATTENTION_OPS
from ..ops.layernorm import is_channels_first_layer_norm
from ..ops.registry import is_prunable_layer, layer_kind, registered_base
from ..ops.served import has_own_forward, serving_probe
from .channel_space import ChannelSpace
from .context import PropagationContext, shapes
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
def layer_inputs(ctx: PropagationContext, node, space: Optional[ChannelSpace], want_dim: int, is_output: bool):
    """Add refs of the layer's channel ranges to the groups of ``space``; partial segments pin their group."""
    if space is None:
        return
    if space.dim != want_dim:
        ctx.fix_space(space, f"{node.target} reads channels on dim {space.dim}, expected {want_dim}")
        return
    offset = 0
    for seg in space.segments:
        if ctx.whole(seg):
            ctx.table.add_ref(seg.gid, ChannelRef(node.target, offset, offset + seg.width, is_output, seg.expand))
        else:
            ctx.table.fix(seg.gid, f"only part of the group reaches {node.target}")
        offset += seg.width


def output_group(ctx: PropagationContext, node, size: int, dim: int, ndim: int) -> ChannelSpace:
    """A new group of ``size`` channels made by the layer of ``node`` (its output channels)."""
    out = ctx.new_space(size, dim, ndim)
    ctx.table.add_ref(out.segments[0].gid, ChannelRef(node.target, 0, size, True))
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
    """Features on the last dim: input read, output a new group."""
    space, ndim = _input(ctx, node), len(shapes(node))
    layer_inputs(ctx, node, space, ndim - 1 if space is None else space.ndim - 1, False)
    return output_group(ctx, node, module.out_features, ndim - 1, ndim)


@layer_rule(nn.LayerNorm)
def layer_norm(ctx: PropagationContext, node, module: nn.LayerNorm):
    """Normalises the last dim (dim 1 for channels-first subclasses); one normalised dim only."""
    space, ndim = _input(ctx, node), len(shapes(node))
    if len(module.normalized_shape) != 1:
        return ctx.unknown(node, "LayerNorm", "normalized over more than one dim")
    dim = _layer_norm_dim(module, ndim)
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

