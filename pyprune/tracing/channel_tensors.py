"""Model tensors and int attributes that are channel-sized: bind them to the group they follow, or pin the group.

A parameter or buffer the model's code uses directly (ConvNeXt's ``layer_scale``, ViT's ``class_token``) joins the
group it meets in an elementwise op or a concatenation as a channel tensor (``ChannelRef.param_dim``), so a pruned
model reads it at the kept channels. A public int attribute that spells the channel width in a reshape (ViT's
``hidden_dim``) joins as a channel count. Anything else channel-sized that meets a group fixes it.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import nn

from .channel_space import ChannelSpace
from .context import PropagationContext, flat_nodes, op_name, shapes
from .spec import ChannelRef
from .tensor_views import TENSOR_PASS, VIEW_OPS, source_dim

def is_model_tensor(model: nn.Module, path) -> bool:
    """Whether ``path`` names a parameter or buffer of ``model``."""
    for getter in (model.get_parameter, model.get_buffer):
        try:
            getter(path)
            return True
        except (AttributeError, TypeError):
            pass
    return False


# Elementwise ops a channel tensor may pass with another operand that is constant along its channel dim (the
# shifted-window mask added to Swin's relative-position bias): slicing the result there slices the channel tensor.
BROADCAST_OPS = ("add", "sub", "mul")


def broadcast_source(model: nn.Module, node: torch.fx.Node, dim: int) -> Optional[Tuple[torch.fx.Node, int]]:
    """(operand, its dim) of a :data:`BROADCAST_OPS` op whose output dim ``dim`` is that whole dim of exactly one
    tensor operand, every other operand being of size 1 there (or not reaching it); None otherwise."""
    out = shapes(node)
    if op_name(node, model) not in BROADCAST_OPS or node.kwargs or len(node.args) != 2 or \
            not isinstance(out, torch.Size) or not 0 <= dim < len(out):
        return None
    found = []
    for arg in node.args:
        shape = shapes(arg) if isinstance(arg, torch.fx.Node) else None
        if shape is None:
            if isinstance(arg, torch.fx.Node) or not isinstance(arg, (int, float)):
                return None  # a node of no known tensor shape, a list, ...
            continue  # a Python number
        at = dim - (len(out) - len(shape))
        if 0 <= at < len(shape) and shape[at] != 1:
            found.append((arg, at))
    return found[0] if len(found) == 1 and shapes(found[0][0])[found[0][1]] == out[dim] else None


def tensor_pass_users(node: torch.fx.Node, model: nn.Module) -> List[torch.fx.Node]:
    """The first users of ``node`` past any chain of :data:`TENSOR_PASS` / :data:`VIEW_OPS` ops on it, and of
    :data:`BROADCAST_OPS` ops that carry one of its dims whole (:func:`broadcast_source`)."""
    out = []
    for user in node.users:
        if op_name(user, model) in TENSOR_PASS | VIEW_OPS and user.args and user.args[0] is node:
            out += tensor_pass_users(user, model)
        elif isinstance(shapes(user), torch.Size) and any(
                (broadcast_source(model, user, d) or (None,))[0] is node for d in range(len(shapes(user)))):
            out += tensor_pass_users(user, model)
        else:
            out.append(user)
    return out


def fix_channel_sized_constants(ctx: PropagationContext, node, out_ndim: int, tracked: Sequence[ChannelSpace],
                                bindable: bool = False) -> None:
    """An untracked operand of ``node`` with a channel-sized dim pins the groups, unless (``bindable``: elementwise
    ops and concatenation along another dim) it is a parameter or buffer of the model, read directly or through
    ``expand`` / ``to`` / ...: then the tensor joins the groups as a channel tensor (ConvNeXt's layer_scale)."""
    for arg in flat_nodes((node.args, node.kwargs)):
        if ctx.space(arg) is not None or not isinstance(shapes(arg), torch.Size):
            continue
        shape = shapes(arg)
        for space in tracked:
            idx = space.dim + out_ndim - space.ndim - (out_ndim - len(shape))
            if not (0 <= idx < len(shape) and shape[idx] > 1):
                continue
            source = channel_tensor_source(ctx.model, arg, idx) if bindable else None
            if source is None:
                ctx.fix_space(space, f"channel-sized tensor {arg.name} used by {ctx.where(node)}")
            else:
                bind_channel_tensor(ctx, node, space, *source)


def channel_tensor_source(model: nn.Module, node, dim: int) -> Optional[Tuple[str, int]]:
    """(path, dim) of the parameter / buffer whose dim ``dim`` becomes ``node``'s dim ``dim`` through ops that keep
    it one whole dim (``expand`` / ``to``, and views, permutes, index lookups along other dims: a relative-position
    bias table; an add of a tensor constant along that dim: a shifted-window mask), or None."""
    while node.op != "get_attr":
        found = source_dim(model, node, dim) or broadcast_source(model, node, dim)
        if found is None:
            return None
        node, dim = found
    if not is_model_tensor(model, node.target):
        return None  # e.g. a constant the recorded forward could not name
    return node.target, dim


def bind_channel_tensor(ctx: PropagationContext, node, space: ChannelSpace, path: str, dim: int) -> None:
    """Add tensor ``path`` (channels on ``dim``) to the groups of ``space``; a partial segment pins its group."""
    offset = 0
    for seg in space.segments:
        if ctx.whole(seg):
            ctx.table.add_ref(seg.gid, ChannelRef(path, offset, offset + seg.width, True, seg.expand, param_dim=dim))
        else:
            ctx.table.fix(seg.gid, f"only part of the group reaches channel tensor {path}")
        offset += seg.width
    ctx.bound_tensors.setdefault(path, []).append((node, space))


def check_bound_tensors(ctx: PropagationContext, graph: torch.fx.Graph) -> None:
    """A channel tensor is sliced for every reader: each use must be one that bound it, and all to the same
    channels; otherwise the groups it joined are pinned. Runs once the whole graph is visited."""
    for path, uses in ctx.bound_tensors.items():
        users = {user for reader in graph.nodes if reader.op == "get_attr" and reader.target == path
                 for user in tensor_pass_users(reader, ctx.model)}
        consistent = all(ctx.same_channels(uses[0][1], space) for _, space in uses)
        if users <= {use for use, _ in uses} and consistent:
            continue
        for _, space in uses:
            ctx.fix_space(space, f"channel tensor {path} is also used in a way pyprune cannot slice")


def count_attribute(model: nn.Module, node, value: int) -> Optional[str]:
    """Path of the one public int attribute equal to ``value`` of the module whose code made ``node``."""
    path = node.meta.get("module_path", "")
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    names = [a for a, v in vars(owner).items() if type(v) is int and v == value and not a.startswith("_")]
    return (f"{path}.{names[0]}" if path else names[0]) if len(names) == 1 else None
