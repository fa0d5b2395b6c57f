"""Capture a model's dataflow as a ``torch.fx.Graph`` whose nodes carry output shapes and module paths.

Two ways, one result: symbolic tracing with torch.fx (fast, sees every branch of the code it traces), and, for models
fx cannot trace (data-dependent control flow), a recording of a real forward pass through a ``TorchFunctionMode``.
Both keep the layers we have DynamicOps for as opaque ``call_module`` nodes.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode

from .rules_layers import is_prunable_layer
from .spec import warn_untraceable


class _PathTracer(torch.fx.Tracer):
    """fx tracer that stamps every node with the path of the module whose code created it."""

    def __init__(self):
        super().__init__()
        self._path = ""

    def trace(self, root, concrete_args=None):
        """Trace through functions marked ``torch.fx.wrap`` (e.g. Swin's ``_patch_merging_pad``) as well: their
        bodies decide how channels move. Functions that cannot be traced make fx fail, and the capture falls back
        to recording a real forward, which sees inside them anyway."""
        wrapped = getattr(torch.fx._symbolic_trace, "_wrapped_fns_to_patch", None)
        saved = dict(wrapped) if isinstance(wrapped, dict) else None
        if saved is not None:
            wrapped.clear()
        try:
            return super().trace(root, concrete_args)
        finally:
            if saved is not None:
                wrapped.update(saved)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_prunable_layer(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        outer, self._path = self._path, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._path = outer

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["module_path"] = self._path
        return node


def fx_capture(model: nn.Module, inputs: Tuple[Tensor, ...]) -> torch.fx.GraphModule:
    """Trace symbolically in train mode (so train-only branches such as aux heads are in the graph), then run the
    graph once in eval mode to record shapes (eval keeps batch-norm happy with a batch of one)."""
    for module in model.modules():  # decide now: while fx traces, parameters read as proxies and probes fail
        is_prunable_layer(module)
    was_training = model.training
    model.train()
    try:
        graph = _PathTracer().trace(model)
    finally:
        model.train(was_training)
    gm = torch.fx.GraphModule(model, graph)
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    return gm


class _Recorder(TorchFunctionMode):
    """Records torch calls made outside prunable layers as fx nodes, mapping tensors to the nodes that made them."""

    def __init__(self, graph: torch.fx.Graph, producers: Dict[int, torch.fx.Node], path_of: Callable[[], str],
                 tensor_names: Dict[int, str]):
        super().__init__()
        self.graph, self.producers, self.path_of = graph, producers, path_of
        self.tensor_names = tensor_names  # id -> path of the model's parameters and buffers
        self.inside_layer = 0
        self._keep = []  # keep outputs alive so their ids stay unique while recording

    def node_for(self, value):
        if isinstance(value, Tensor):
            node = self.producers.get(id(value))
            if node is None:  # a parameter, buffer (named by its path, as fx does) or constant
                target = self.tensor_names.get(id(value), f"_const_{len(self.producers)}")
                node = self.graph.create_node("get_attr", target)
                _set_meta(node, value, self.path_of())
                self.producers[id(value)] = node
                self._keep.append(value)
            return node
        if isinstance(value, (list, tuple)):
            return type(value)(self.node_for(v) for v in value)
        if isinstance(value, dict):
            return {k: self.node_for(v) for k, v in value.items()}
        return value

    def record(self, kind: str, target, args, kwargs, out):
        node = self.graph.create_node(kind, target, self.node_for(tuple(args)), self.node_for(dict(kwargs)))
        _set_meta(node, out, self.path_of())
        self._register_outputs(node, out)
        return node

    def _register_outputs(self, node, out):
        if isinstance(out, Tensor):
            self.producers[id(out)] = node
            self._keep.append(out)
        elif isinstance(out, (list, tuple)):
            for i, item in enumerate(out):
                if isinstance(item, Tensor):
                    getter = self.graph.create_node("call_function", _getitem, (node, i))
                    _set_meta(getter, item, node.meta["module_path"])
                    self.producers[id(item)] = getter
                    self._keep.append(item)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_layer == 0 and not _is_metadata_call(func):
            self.record("call_function", func, args, kwargs, out)
        return out


def _getitem(value, index):
    return value[index]


def _is_metadata_call(func) -> bool:
    name = getattr(func, "__name__", "")
    return name in ("size", "dim", "__get__", "numel", "__len__", "is_floating_point", "data_ptr") or \
        func is Tensor.shape.__get__


def _set_meta(node, value, path):
    node.meta["module_path"] = path
    if isinstance(value, Tensor):
        node.meta["tensor_meta"] = _TensorShape(tuple(value.shape))
    elif isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
        node.meta["tensor_meta"] = tuple(_TensorShape(tuple(v.shape)) if isinstance(v, Tensor) else None
                                         for v in value)


class _TensorShape:
    """The part of fx's TensorMetadata the propagation reads."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)


def forward_capture(model: nn.Module, inputs: Tuple[Tensor, ...]) -> torch.fx.Graph:
    """Record a real forward (no grad) as an fx graph; works where symbolic tracing cannot.

    Recorded in train mode, so train-only branches (auxiliary heads) are seen; when a train-mode forward cannot run
    on the example (batch norm on a batch of one), in eval mode. Prunable layers the recorded forward never reached
    are reported with a warning: their channels are not analysed.
    """
    was_training = model.training
    try:
        try:
            graph = _record(model, inputs, training=True)
        except Exception:
            graph = _record(model, inputs, training=False)
    finally:
        model.train(was_training)
    reached = {node.target for node in graph.nodes if node.op == "call_module"}
    missed = [name for name, m in model.named_modules() if is_prunable_layer(m) and name not in reached]
    if missed:
        warn_untraceable(f"the recorded forward never ran the layers {missed[:8]}{' ...' if len(missed) > 8 else ''}"
                         f" (branches the example input does not take); their channels are not analysed, so a "
                         f"group feeding them may be pruned under them: mark them fixed=[...] or give a demo input "
                         f"that reaches them")
    return graph


def _record(model: nn.Module, inputs: Tuple[Tensor, ...], training: bool) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    producers: Dict[int, torch.fx.Node] = {}
    names = {m: n for n, m in model.named_modules()}
    stack = [""]
    tensor_names = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    recorder = _Recorder(graph, producers, lambda: stack[-1], tensor_names)
    for i, x in enumerate(inputs):
        node = graph.placeholder(f"input_{i}")
        _set_meta(node, x, "")
        producers[id(x)] = node
        recorder._keep.append(x)

    def pre_hook(module, args):
        stack.append(names[module])
        if is_prunable_layer(module):
            recorder.inside_layer += 1

    def post_hook(module, args, out):
        stack.pop()
        if is_prunable_layer(module):
            recorder.inside_layer -= 1
            if recorder.inside_layer == 0:
                recorder.record("call_module", names[module], args, {}, out)

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    model.train(training)
    try:
        with torch.no_grad(), recorder:
            out = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    graph.output(recorder.node_for(out))
    return graph


def capture(model: nn.Module, inputs: Tuple[Tensor, ...], tracer: str) -> Tuple[torch.fx.Graph, Optional[str]]:
    """(graph, note) with ``tracer`` in "fx" | "torch_function" | "auto" (fx, then the real-forward recording)."""
    if tracer == "torch_function":
        return forward_capture(model, inputs), None
    try:
        return fx_capture(model, inputs).graph, None
    except Exception as error:  # fx raises many types for untraceable Python (TraceError, TypeError, ...)
        if tracer == "fx":
            raise
        note = f"torch.fx could not trace the model ({type(error).__name__}: {error}); recorded a real forward"
        return forward_capture(model, inputs), note
