"""Run a captured fx graph on example inputs to stamp output shapes on its nodes; say where and why a run fails,
and find a larger input that runs when the example is too small (e.g. a train-only head needs 299 px)."""
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

import torch
import torch.fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .example_inputs import CallArgs, tensor_leaves

# Doubling the spatial dims of a too-small example input stops before a side exceeds this.
MAX_SEARCH_SIDE = 1024


class TensorShape:
    """The part of fx's ``TensorMetadata`` the propagation reads (``node.meta["tensor_meta"].shape`` and
    ``.dtype``, which tells an index tensor from a boolean mask)."""

    def __init__(self, shape, dtype=None):
        self.shape = torch.Size(shape)
        self.dtype = dtype


class ForwardFailure(Exception):
    """A forward pass failed on the example input. ``where`` names the layer or op, ``error`` is what it raised."""

    def __init__(self, where: str, error: BaseException):
        super().__init__(where, error)
        self.where, self.error = where, error

    def __str__(self) -> str:
        lines = str(self.error).strip().splitlines() or [""]
        return f"{self.where} raised {type(self.error).__name__}: {lines[0][:300]}"


def describe_module(model: nn.Module, path: str) -> str:
    """``layer 'a.b' (Conv2d)`` for a module path of ``model``; ``the model`` for the root."""
    if not path:
        return "the model"
    return f"layer '{path}' ({type(model.get_submodule(path)).__name__})"


class ShapePass(torch.fx.Interpreter):
    """Runs the graph and stamps each node's output shapes, as fx's ``ShapeProp`` does, without printing a traceback
    when a node fails: it raises :class:`ForwardFailure` naming the node's layer or op instead."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # keep the op's own message as it is

    def run_node(self, n: torch.fx.Node):
        try:
            result = super().run_node(n)
        except Exception as error:
            raise ForwardFailure(self._where(n), error) from error
        found = []

        def stamp(value):
            if isinstance(value, Tensor):
                found.append(value)
                return TensorShape(value.shape, value.dtype)
            return value
        meta = torch.fx.node.map_aggregate(result, stamp)
        if found:
            n.meta["tensor_meta"] = meta
        return result

    def _where(self, n: torch.fx.Node) -> str:
        if n.op == "call_module":
            return describe_module(self.module, n.target)
        path = n.meta.get("module_path", "")
        return f"op '{getattr(n.target, '__name__', n.target)}' in module '{path or '<top>'}'"


@contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Every module of ``model`` in train (``training``) or eval mode; each module's own flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def placeholder_values(gm: torch.fx.GraphModule, inputs: CallArgs) -> list:
    """The value of each placeholder of ``gm`` (one per parameter of the traced ``forward``) for the call ``inputs``:
    positional inputs in order, then keyword inputs by name, then the parameter's default. ValueError where the
    call does not fit (``*args`` / ``**kwargs`` parameters, an unknown or missing input)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    positional, keywords, values = list(inputs.args), dict(inputs.kwargs), []
    for node in placeholders:
        if node.target.startswith("*"):
            raise ValueError(f"forward takes {node.target}")
        if positional:
            values.append(positional.pop(0))
        elif node.target in keywords:
            values.append(keywords.pop(node.target))
        elif node.args:  # the parameter's default, as fx recorded it
            values.append(node.args[0])
        else:
            raise ValueError(f"no input for forward's parameter {node.target!r}")
    if positional or keywords:
        raise ValueError(f"forward takes no more inputs (left: {len(positional)} positional, keywords "
                         f"{sorted(keywords)})")
    return values


def run_shapes(gm: torch.fx.GraphModule, values: Sequence) -> None:
    """Stamp output shapes on the nodes of ``gm``, running it on its placeholder ``values`` in eval mode without
    grad; :class:`ForwardFailure` if a node fails. The graph itself may hold train-only branches (aux heads): they
    run too."""
    with training_mode(gm, False), torch.no_grad():  # eval: batch norm runs on a batch of one
        ShapePass(gm).run(*values)


def larger_input_that_runs(gm: torch.fx.GraphModule, values: Sequence) -> Optional[List[torch.Size]]:
    """Shapes of the input tensors of the smallest input that runs ``gm`` among the example's spatial dims (dims
    2.. of tensors with 3 or more dims) doubled, quadrupled, ... up to :data:`MAX_SEARCH_SIDE`; None if none does
    or nothing can grow. Deterministic: zeros of those shapes are run (the graph has no data-dependent branches)."""
    if not any(x.dim() >= 3 for x in tensor_leaves(list(values))):
        return None
    factor = 2
    while True:
        def grown(x):
            if not isinstance(x, Tensor) or x.dim() < 3:
                return x
            return torch.zeros(list(x.shape[:2]) + [d * factor for d in x.shape[2:]], dtype=x.dtype, device=x.device)
        trial = pytree.tree_map(grown, list(values))
        if max(max(t.shape[2:], default=0) for t in tensor_leaves(trial)) > MAX_SEARCH_SIDE:
            return None
        try:
            run_shapes(gm, trial)
            return [t.shape for t in tensor_leaves(trial)]
        except ForwardFailure:
            factor *= 2


def shape_text(shapes: Sequence[torch.Size]) -> str:
    """``(1, 3, 224, 224)`` for one input, ``(1, 3, 224, 224), (1, 10)`` for several."""
    return ", ".join(str(tuple(s)) for s in shapes)
