"""Run a captured fx graph on example inputs to stamp output shapes on its nodes; say where and why a run fails,
and find a larger input that runs when the example is too small (e.g. a train-only head needs 299 px)."""
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import Tensor, nn

# Doubling the spatial dims of a too-small example input stops before a side exceeds this.
MAX_SEARCH_SIDE = 1024


class TensorShape:
    """The part of fx's ``TensorMetadata`` the propagation reads (``node.meta["tensor_meta"].shape``)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)


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
                return TensorShape(value.shape)
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


def run_shapes(gm: torch.fx.GraphModule, inputs: Sequence[Tensor]) -> None:
    """Stamp output shapes on the nodes of ``gm``, running it in eval mode without grad; :class:`ForwardFailure`
    if a node fails. The graph itself may hold train-only branches (aux heads): they run too."""
    with training_mode(gm, False), torch.no_grad():  # eval: batch norm runs on a batch of one
        ShapePass(gm).run(*inputs)


def larger_input_that_runs(gm: torch.fx.GraphModule, inputs: Sequence[Tensor]) -> Optional[Tuple[torch.Size, ...]]:
    """Shapes of the smallest input that runs ``gm`` among the example's spatial dims (dims 2.. of inputs with 3 or
    more dims) doubled, quadrupled, ... up to :data:`MAX_SEARCH_SIDE`; None if none does or nothing can grow.
    Deterministic: zeros of those shapes are run (the graph has no data-dependent branches)."""
    if not any(x.dim() >= 3 for x in inputs):
        return None
    factor = 2
    while True:
        shapes = tuple(torch.Size(list(x.shape[:2]) + [d * factor for d in x.shape[2:]]) if x.dim() >= 3
                       else x.shape for x in inputs)
        if max(max(s[2:], default=0) for s in shapes) > MAX_SEARCH_SIDE:
            return None
        try:
            run_shapes(gm, [torch.zeros(s, dtype=x.dtype, device=x.device) for s, x in zip(shapes, inputs)])
            return shapes
        except ForwardFailure:
            factor *= 2


def shape_text(shapes: Sequence[torch.Size]) -> str:
    """``(1, 3, 224, 224)`` for one input, ``(1, 3, 224, 224), (1, 10)`` for several."""
    return ", ".join(str(tuple(s)) for s in shapes)
