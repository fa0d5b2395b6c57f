"""Run a captured fx graph on example inputs to stamp output shapes on its nodes; say where and why a run fails,
and find a larger input that runs when the example is too small (e.g. a train-only head needs 299 px).

Convolutions and linear layers are not computed: :mod:`.layer_shapes` gives their output shape, and a zero tensor
of that shape runs on (the pass needs shapes, and these layers are nearly all of a forward's arithmetic). Every
value that derives from such zeros is tracked; where one would decide a shape - a data-dependent op (``nonzero``,
a boolean mask, ``.item()``) or a zero-dim tensor handed to another op - the pass starts again computing every
layer, and that run's shapes (or failure) are the ones reported. A failure with skipped layers is likewise
re-run in full, so a model's error is always its own.
"""
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

import torch
import torch.fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .example_inputs import CallArgs, tensor_leaves
from .layer_shapes import ValuesNeeded, can_skip, has_hooks, reads_values, skipped_output

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


# Attributes of a tensor that its shape alone decides (exact, whatever the values).
SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "layout", "is_cuda"})


class ShapePass(torch.fx.Interpreter):
    """Runs the graph and stamps each node's output shapes, as fx's ``ShapeProp`` does, without printing a traceback
    when a node fails: it raises :class:`ForwardFailure` naming the node's layer or op instead.

    ``skip_layers``: plain convolutions and linear layers output zeros of their shape (see the module docstring);
    :class:`ValuesNeeded` where a later node's shape could depend on those values."""

    def __init__(self, gm: torch.fx.GraphModule, skip_layers: bool = False):
        super().__init__(gm)
        self.extra_traceback = False  # keep the op's own message as it is
        self.skip_layers = skip_layers
        self.derived = set()  # nodes whose value derives from a skipped layer's zeros
        self._skipped = False

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if self.skip_layers and can_skip(module) and not has_hooks(module):
            out = skipped_output(module, args, kwargs)
            if out is not None:
                self._skipped = True
                return out
        return super().call_module(target, args, kwargs)

    def run_node(self, n: torch.fx.Node):
        derived = self.skip_layers and any(i in self.derived for i in n.all_input_nodes)
        if derived and self._reads_values(n):
            raise ValuesNeeded(n.name)
        self._skipped = False
        try:
            result = super().run_node(n)
        except Exception as error:
            raise ForwardFailure(self._where(n), error) from error
        if (derived or self._skipped) and not (n.target is getattr and n.args[1:2] and
                                               n.args[1] in SHAPE_ATTRIBUTES or n.target in ("size", "dim", "numel")):
            self.derived.add(n)
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

    def _reads_values(self, n: torch.fx.Node) -> bool:
        """Whether ``n``'s output may depend on the values of its inputs that derive from skipped layers."""
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        derived = {id(self.env[i]) for i in n.all_input_nodes if i in self.derived}
        return reads_values(name, args, kwargs, lambda t: id(t) in derived)

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
        try:
            ShapePass(gm, skip_layers=True).run(*values)
            return
        except (ValuesNeeded, ForwardFailure):
            pass
        for node in gm.graph.nodes:  # what the first run stamped before it stopped is stamped again
            node.meta.pop("tensor_meta", None)
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
