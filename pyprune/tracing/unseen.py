"""Layers the captured graph never ran (a train-only branch the example input is too small for): whatever channels
they read or feed must not be pruned, since no rule saw how they use them.

The symbolic fx graph still shows where those layers sit. From each unseen layer, walk its inputs back and its
outputs forward through non-layer ops to the nearest layers the recording did run, and fix the channel groups that
flow out of those (backward) or into them (forward), and channel tensors the unseen branch reads.
"""
from typing import Callable, Dict, Iterable, Iterator, List

import torch.fx

from ..errors import UntraceableOpError
from .capture import Capture
from .context import PropagationContext
from .rules_layers import is_prunable_layer
from .spec import warn_untraceable


def handle_unseen(ctx: PropagationContext, captured: Capture, strict: bool) -> None:
    """Fix what ``captured.unseen`` layers read or feed and warn naming them; in strict mode refuse instead."""
    if not captured.unseen:
        return
    if strict:
        raise UntraceableOpError(f"{unseen_message(captured)}. Give an example input that reaches them or trace "
                                 f"without strict=True")
    if captured.structure is not None:
        fix_unseen(ctx, captured.graph, captured.structure, captured.unseen)
    warn_untraceable(unseen_message(captured))


def unseen_message(captured: Capture) -> str:
    names = captured.unseen
    listed = f"{names[:8]}{' ...' if len(names) > 8 else ''}"
    if captured.structure is None:
        what = ("torch.fx cannot trace the model, so what they read is unknown and a group feeding them may be pruned "
                "under them: mark them fixed=[...] or give an example input that reaches them")
    else:
        what = "the channel groups they read or feed are not pruned"
    hint = f" ({captured.hint})" if captured.hint else ""
    return f"{captured.source} never ran the layers {listed}{hint}; {what}"


def fix_unseen(ctx: PropagationContext, recorded: torch.fx.Graph, structure: torch.fx.Graph,
               unseen: Iterable[str]) -> None:
    """Fix the groups between every unseen layer of ``structure`` and its nearest layers that ``recorded`` ran."""
    unseen = set(unseen)
    runs: Dict[str, List[torch.fx.Node]] = {}  # layer path -> its calls in the recorded graph
    for node in recorded.nodes:
        if node.op == "call_module":
            runs.setdefault(node.target, []).append(node)
    reason = f"read or fed by layers the example input does not reach ({_short(sorted(unseen))})"
    for node in structure.nodes:
        if node.op != "call_module" or node.target not in unseen:
            continue
        for near in _nearest(node, lambda n: n.all_input_nodes, ctx):
            if near.op == "get_attr":  # a channel tensor the unseen branch reads
                for _, space in ctx.bound_tensors.get(near.target, []):
                    ctx.fix_space(space, reason)
            for call in runs.get(near.target, []):  # what the recorded layer puts out
                for space in ctx.spaces_in(call):
                    ctx.fix_space(space, reason)
        for near in _nearest(node, lambda n: list(n.users), ctx):
            for call in runs.get(near.target, []):  # what the recorded layer takes in
                for space in ctx.spaces_in((call.args, call.kwargs)):
                    ctx.fix_space(space, reason)


def _nearest(start: torch.fx.Node, step: Callable[[torch.fx.Node], List[torch.fx.Node]],
             ctx: PropagationContext) -> Iterator[torch.fx.Node]:
    """The layer and get_attr nodes first met walking from ``start`` by ``step`` (inputs or users)."""
    seen, todo = set(), list(step(start))
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "get_attr" or (node.op == "call_module" and
                                     is_prunable_layer(ctx.model.get_submodule(node.target))):
            yield node
        else:
            todo += step(node)


def _short(names: List[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
