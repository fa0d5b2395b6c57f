"""Walk a captured graph and work out which channels are coupled.

Every node gets a value (see :mod:`.context`): the model input starts a fixed group, the model outputs
:mod:`.outputs` keeps fix their groups; layers go to their layer rule
(:mod:`.rules_layers`); ints read from channel dims are tracked by :mod:`.sizes`; every other op goes to the rule
registered for its name (:data:`.context.OP_RULES`: :mod:`.rules_shape`, :mod:`.rules_elementwise`), or, if none,
to the generic rule that passes channels through ops keeping the channel dim in place. Whatever cannot be mapped
fixes the groups it touches, so no pruned shape can go wrong.
"""
from typing import Iterable

import torch
import torch.fx
from torch import nn

from . import rules_attention, rules_elementwise, rules_layer_weights, rules_shape, rules_writes
from .channel_tensors import check_bound_tensors
from .fused import check_slice_bounds
from .channel_space import PartedSpace
from .context import OP_RULES, PropagationContext, flat_nodes, op_name, shapes
from .outputs import fixed_parts, is_model_output_type
from ..ops.registry import unservable_reason
from .rules_layers import apply_layer_rule, is_prunable_layer
from .rules_elementwise import generic, no_tensor
from .sizes import check_sizes, check_unchecked_sizes, fold_plain_ints, size_value

# The modules whose ``@op_rule`` functions fill OP_RULES (importing them registers the rules).
RULE_MODULES = (rules_elementwise, rules_shape, rules_writes, rules_attention, rules_layer_weights)
NO_TENSOR = {"size", "dim", "numel", "getattr"}


def propagate(model: nn.Module, graph: torch.fx.Graph, strict: bool = False, gqa: str = "keep_kv",
              recorded: bool = False, fixed_outputs=None) -> PropagationContext:
    """Give every node of ``graph`` its value; the coupled groups end up in the returned context's ``table``.
    ``recorded``: the graph is a recorded forward, whose shapes are plain numbers even where the code read them
    from tensors. ``fixed_outputs``: which outputs keep their channels (:mod:`.outputs`; None: its default)."""
    ctx = PropagationContext(model, strict, gqa)
    ctx.recorded = recorded
    ctx.fixed_outputs = fixed_outputs
    for node in graph.nodes:
        fold_plain_ints(ctx, node)
        ctx.spaces[node] = visit(ctx, node)
        check_sizes(ctx, node)
    check_unchecked_sizes(ctx)
    check_bound_tensors(ctx, graph)
    check_slice_bounds(ctx)
    return ctx


def visit(ctx: PropagationContext, node: torch.fx.Node):
    """The value of ``node`` from the values of its inputs: the dispatch from node to rule."""
    if node.op == "placeholder":
        shape = shapes(node)
        if not isinstance(shape, torch.Size) or len(shape) < 2 or node.meta.get("nested_input"):
            return None  # no channel dim known (inside a list of inputs): untracked, pinning what it meets
        return ctx.new_space(shape[1], 1, len(shape), "model input")
    if node.op == "get_attr":
        return None
    if node.op == "output":
        output = node.args[0] if node.args else None
        for part in fixed_parts(output, ctx.fixed_outputs, _stands_for_model_output(ctx, node)):
            for space in ctx.spaces_in(part):
                ctx.fix_space(space, "model output")
        return None
    name = op_name(node, ctx.model)
    parted = [a for a in flat_nodes((node.args, node.kwargs)) if isinstance(ctx.spaces.get(a), PartedSpace)]
    if parted and name not in rules_shape.PARTED_RULES:
        return _reads_parted(ctx, node, name, parted)
    if node.op == "call_module":
        module = ctx.model.get_submodule(node.target)
        if is_prunable_layer(module):
            return apply_layer_rule(ctx, node, module)
        if any(True for _ in module.parameters(recurse=True)) or any(True for _ in module.buffers()):
            return ctx.unknown(node, name, unservable_reason(module))  # state we have no DynamicOp for
    if name in ("getitem", "setitem"):  # getitem indexes tuples of spaces and sizes too; setitem returns nothing
        return OP_RULES[name](ctx, node, name)
    if shapes(node) is None and node.op != "call_module":
        size = size_value(ctx, node, name)
        if size is not None:
            return size
    if isinstance(node.target, type) and issubclass(node.target, tuple):  # a NamedTuple of outputs
        return tuple(ctx.spaces.get(a) if isinstance(a, torch.fx.Node) else None for a in node.args)
    if name in NO_TENSOR or shapes(node) is None:
        return no_tensor(ctx, node, name)
    return OP_RULES.get(name, generic)(ctx, node, name)


def _stands_for_model_output(ctx: PropagationContext, node: torch.fx.Node) -> bool:
    """Whether the output node stands for a transformers ``ModelOutput``: the recording notes the type it saw;
    torch.fx writes any dict as a plain one, so there a dict returned by a transformers model counts as one."""
    kind = node.meta.get("output_type")
    if kind is not None:
        return is_model_output_type(kind)
    return isinstance(node.args[0] if node.args else None, dict) and \
        type(ctx.model).__module__.startswith("transformers.")


def _reads_parted(ctx: PropagationContext, node: torch.fx.Node, name: str, parted):
    """An op reading fused heads (channels over a parts dim and a heads dim): passed on by ops that return the
    tensor unchanged, fixed by any other op (no other rule knows such a value)."""
    tensors = [a for a in flat_nodes((node.args, node.kwargs)) if isinstance(shapes(a), torch.Size)]
    if name in rules_shape.PARTED_PASS and tensors == parted[:1] and shapes(node) == shapes(parted[0]):
        return ctx.parted(parted[0])
    return ctx.unknown(node, name, "it reads q / k / v heads fused on one dim (only permute, unbind and "
                                   "indexing of that dim are followed)")


def fix_modules(ctx: PropagationContext, graph: torch.fx.Graph, names: Iterable[str]) -> None:
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
        for space in ctx.spaces_in((node.args, node.kwargs)) + ctx.spaces_in(node):
            ctx.fix_space(space, f"module '{hit}' is fixed by the user")
