"""Rules for ops that keep the channel dim's size: elementwise and broadcasting ops, reductions, functional norms,
and the fallback for ops with no rule of their own (pass channels through where the op keeps the channel dim)."""
import torch
import torch.fx

from .channel_tensors import fix_channel_sized_constants
from .context import PropagationContext, dim_arg, flat_nodes, op_rule, shapes

ELEMENTWISE = ("add", "iadd", "add_", "radd", "sub", "isub", "sub_", "rsub", "mul", "imul", "mul_", "rmul",
               "truediv", "itruediv", "rtruediv", "div", "div_", "maximum", "minimum", "where")
REDUCE = ("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod")


@op_rule(*ELEMENTWISE)
def elementwise(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """Operands carrying channels on one dim share them (their groups merge); a channel-sized model tensor among
    the operands joins the groups; a 1-channel operand broadcast over the channels is fixed."""
    out_shape = shapes(node)
    if not isinstance(out_shape, torch.Size):
        return ctx.unknown(node, name)
    ndim = len(out_shape)
    tracked = ctx.tracked(node)
    if not tracked:
        return None
    fix_channel_sized_constants(ctx, node, ndim, tracked, bindable=True)
    dims = {s.dim + ndim - s.ndim for s in tracked}
    if len(dims) != 1:
        return ctx.unknown(node, name, "operands carry channels on different dims")
    dim = dims.pop()
    full = [s for s in tracked if s.width == out_shape[dim]]
    for s in tracked:
        if s.width != out_shape[dim]:  # a 1-channel map broadcast over the channels (spatial attention)
            ctx.fix_space(s, f"broadcast by {ctx.where(node)}")
    if not full:
        return None
    ctx.merge_spaces(full, f"{ctx.where(node)} couples channels of different sizes")
    return full[0].with_dim(dim, ndim)


@op_rule(*REDUCE)
def reduce(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """Reduced over the channel dim: nothing channel-shaped is left; over other dims: the channel dim moves."""
    space = ctx.space(node.args[0])
    if space is None:
        return None
    dims = dim_arg(node, 1)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if dims is None:
        return None
    dims = [d % space.ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if space.dim in dims:
        return None
    shift = 0 if keepdim else sum(1 for d in dims if d < space.dim)
    return space.with_dim(space.dim - shift, len(shapes(node)))


@op_rule("layer_norm")
def functional_layer_norm(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """``F.layer_norm(x, (C,))``: the literal C stays C when the group is pruned, so the group is fixed."""
    tracked = ctx.tracked(node)
    if len(tracked) == 1 and isinstance(shapes(node), torch.Size) and _mentions(node, tracked[0].width):
        return ctx.unknown(node, name, f"an argument equals the channel count {tracked[0].width}")
    return generic(ctx, node, name)


@op_rule("group_norm")
def functional_group_norm(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """``F.group_norm(x, G)`` on one whole group: a selection must keep the same count in each of the G groups."""
    tracked = ctx.tracked(node)
    if len(tracked) == 1 and isinstance(shapes(node), torch.Size):
        space, groups = tracked[0], dim_arg(node, 1)
        if isinstance(groups, int) and space.dim == 1 and len(space.segments) == 1 and ctx.whole(space.segments[0]):
            ctx.table.constrain_groups(space.segments[0].gid, groups)
    return generic(ctx, node, name)


def generic(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """Ops with no rule (activations, pooling, dropout, ...): pass channels through when the op keeps the channel
    dim in place; several operands of the output's shape act elementwise; anything else fixes its groups."""
    out_shape = shapes(node)
    tracked = ctx.tracked(node)
    if not tracked:
        return None
    if not isinstance(out_shape, torch.Size):
        return ctx.unknown(node, name)
    if len(tracked) > 1:
        in_shapes = {tuple(shapes(a)) for a in flat_nodes((node.args, node.kwargs)) if ctx.space(a)}
        if in_shapes == {tuple(out_shape)}:
            return elementwise(ctx, node, name)
        return ctx.unknown(node, name)
    space = tracked[0]
    if len(out_shape) == space.ndim and out_shape[space.dim] == space.width:
        fix_channel_sized_constants(ctx, node, len(out_shape), tracked)
        return space
    return ctx.unknown(node, name)


def no_tensor(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """Metadata ops and ops whose output is not a tensor: nothing to track (fix the inputs if it has a shape)."""
    if shapes(node) is not None and ctx.spaces_in((node.args, node.kwargs)):
        return ctx.unknown(node, name)
    return None


def _mentions(node: torch.fx.Node, width: int) -> bool:
    """Whether a plain int argument of ``node`` (nested in tuples / lists too) equals ``width`` (> 1)."""
    found = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), lambda v: found.append(type(v) is int and v == width) or v)
    return width > 1 and any(found)


# Ops that keep every dim's size but move values along the dims they are given: along the channel dim they reorder
# (or mix in order) the channels, so a pruned channel index would no longer name the same channel afterwards.
ALONG_DIMS = {"roll": (2, "dims"), "flip": (1, "dims"), "cumsum": (1, "dim"), "cumprod": (1, "dim"),
              "logcumsumexp": (1, "dim"), "sort": (1, "dim"), "argsort": (1, "dim")}


@op_rule(*ALONG_DIMS)
def along_dims(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """``roll`` / ``flip`` / ``cumsum`` / ``sort`` ... over the channel dim (or, for ``roll`` without dims, over
    the flattened tensor) fix the group; over other dims the channels pass through (``sort`` returns its values and
    indices both on the input's channels)."""
    space = ctx.space(node.args[0]) if node.args else None
    if space is None:
        return generic(ctx, node, name)
    index, keyword = ALONG_DIMS[name]
    default = -1 if name in ("sort", "argsort") else None
    dims = node.args[index] if len(node.args) > index else node.kwargs.get(keyword, default)
    dims = [] if dims is None else (list(dims) if isinstance(dims, (list, tuple)) else [dims])
    if not dims or any(not isinstance(d, int) or d % space.ndim == space.dim for d in dims):
        return ctx.unknown(node, name, "it reorders values along the channel dim")
    return (space, space) if name == "sort" else generic(ctx, node, name)
