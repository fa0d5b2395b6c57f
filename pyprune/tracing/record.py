"""Record a real forward pass as a ``torch.fx.Graph``, for models torch.fx cannot trace symbolically.

A ``TorchFunctionMode`` sees every torch call; calls made outside prunable layers become fx nodes, each prunable
layer one opaque ``call_module`` node, as in the symbolic graph. Nodes carry output shapes and module paths. Sizes
read from recorded tensors are ints that carry their nodes (:mod:`.traced_ints`), as a symbolic graph's would be.

Plain convolutions and linear layers are not computed (:mod:`.layer_shapes`): they return zeros of their output
shape. The mode sees every op that reads values derived from those zeros; where one would turn them into a shape or
a Python value (the model's own ``if`` included: ``Tensor.__bool__``), the forward is recorded again, every layer
computed.
"""
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.fx
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .example_inputs import CallArgs, call_model, tensor_leaves
from .layer_shapes import ValuesNeeded, can_skip, reads_values, skipped_output, tensors_in
from .rules_layers import is_prunable_layer
from .shape_pass import ForwardFailure, TensorShape, describe_module, training_mode
from .traced_ints import INT_VALUE, TracedShape, is_shape_read, traced_node, traced_size


@dataclass
class Recording:
    """A recorded forward: its graph, the prunable layers it never ran, and why train mode was not recorded."""
    graph: torch.fx.Graph
    missed: List[str] = field(default_factory=list)
    train_failure: Optional[ForwardFailure] = None


def forward_capture(model: nn.Module, inputs: CallArgs) -> Recording:
    """Record a real forward (no grad) in train mode, so train-only branches (auxiliary heads) are seen; where a
    train-mode forward cannot run on the example (batch norm on a batch of one, a head the input is too small
    for), in eval mode. Raises :class:`ForwardFailure` if neither runs."""
    train_failure = None
    try:
        graph = _record(model, inputs, training=True)
    except ForwardFailure as failure:
        train_failure = failure
        graph = _record(model, inputs, training=False)
    reached = {node.target for node in graph.nodes if node.op == "call_module"}
    # a layer whose weight the code around it reads (``F.linear(x, self.qkv.weight)``, rules_layer_weights) ran
    reached |= {node.target.rpartition(".")[0] for node in graph.nodes if node.op == "get_attr"}
    layers = [name for name, m in model.named_modules() if is_prunable_layer(m)]
    layer_names = set(layers)  # a layer inside another (attention's out_proj): a dotted prefix of it is a layer
    inner = {name for name in layers
             if any(name[:i] in layer_names for i, char in enumerate(name) if char == ".")}
    missed = [name for name in layers if name not in reached and name not in inner]
    return Recording(graph, missed, train_failure)


class _Recorder(TorchFunctionMode):
    """Records torch calls made outside prunable layers as fx nodes, mapping tensors to the nodes that made them."""

    def __init__(self, graph: torch.fx.Graph, producers: Dict[int, torch.fx.Node], path_of: Callable[[], str],
                 tensor_names: Dict[int, str]):
        super().__init__()
        self.graph, self.producers, self.path_of = graph, producers, path_of
        self.tensor_names = tensor_names  # id -> path of the model's parameters and buffers
        self.inside_layer = 0
        self.recording = True  # traced ints the model keeps make no nodes once the forward is over
        self._keep = []  # keep outputs alive so their ids stay unique while recording
        self.derived = set()  # ids of tensors whose values derive from a skipped layer's zeros

    def node_for(self, value):
        traced = traced_node(value)
        if traced is not None:
            return traced
        if isinstance(value, Tensor):
            node = self.producers.get(id(value))
            if node is None:  # a parameter, buffer (named by its path, as fx does) or constant
                target = self.tensor_names.get(id(value), f"_const_{len(self.producers)}")
                node = self.graph.create_node("get_attr", target)
                _set_meta(node, value, self.path_of())
                self.producers[id(value)] = node
                self._keep.append(value)
            return node
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple (GoogLeNet's train outputs)
            return type(value)(*(self.node_for(v) for v in value))
        if isinstance(value, TracedShape):
            return tuple(self.node_for(v) for v in value)
        if isinstance(value, (list, tuple)):
            return type(value)(self.node_for(v) for v in value)
        if isinstance(value, slice):  # x[:, :n] with n read from a shape
            return slice(self.node_for(value.start), self.node_for(value.stop), self.node_for(value.step))
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
                    # operator.getitem, as fx writes it: the getitem rule hands on the item's channel space
                    getter = self.graph.create_node("call_function", operator.getitem, (node, i))
                    _set_meta(getter, item, node.meta["module_path"])
                    self.producers[id(item)] = getter
                    self._keep.append(item)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        derived = bool(self.derived) and any(id(v) in self.derived for v in tensors_in((args, kwargs)))
        name = getattr(func, "__name__", "")
        if derived and reads_values(name, args, kwargs, lambda t: id(t) in self.derived):
            raise ValuesNeeded(name)
        out = func(*args, **kwargs)
        if derived:
            in_place = name == "__setitem__" or (name.endswith("_") and not name.startswith("_"))
            written = [args[0]] if args and in_place else []
            self.derived.update(id(v) for v in tensors_in((out, written, kwargs.get("out"))))
        if self.inside_layer == 0:
            reads_size, is_property = is_shape_read(func)
            if reads_size and args and id(args[0]) in self.producers:
                return self._traced_size(func, args, kwargs, out, is_property)
            if not _is_metadata_call(func):
                self.record("call_function", func, args, kwargs, out)
        return out

    def _traced_size(self, func, args, kwargs, out, is_property: bool):
        """``x.shape`` (recorded as fx writes it, ``getattr(x, "shape")``), ``x.size()`` or ``x.size(d)`` of a
        recorded tensor, as traced ints."""
        if is_property:
            node = self.graph.create_node("call_function", getattr, (self.node_for(args[0]), "shape"))
        else:
            node = self.graph.create_node("call_function", func, self.node_for(tuple(args)),
                                          self.node_for(dict(kwargs)))
        node.meta["module_path"] = self.path_of()
        return traced_size(out, node, self.int_node, self.shape_item)

    def int_node(self, target, args, value):
        """A node for int arithmetic on traced ints (None once the recording is over)."""
        if not self.recording:
            return None
        node = self.graph.create_node("call_function", target, self.node_for(tuple(args)))
        node.meta.update(module_path=self.path_of(), **{INT_VALUE: value})
        return node

    def shape_item(self, shape: torch.fx.Node, index: int, value: int) -> torch.fx.Node:
        node = self.graph.create_node("call_function", operator.getitem, (shape, index))
        node.meta.update(module_path=shape.meta["module_path"], **{INT_VALUE: value})
        return node


def _is_metadata_call(func) -> bool:
    name = getattr(func, "__name__", "")
    return name in ("size", "dim", "__get__", "numel", "__len__", "is_floating_point", "data_ptr")


def _set_meta(node, value, path):
    node.meta["module_path"] = path
    if isinstance(value, Tensor):
        node.meta["tensor_meta"] = TensorShape(tuple(value.shape), value.dtype)
    elif isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
        node.meta["tensor_meta"] = tuple(TensorShape(tuple(v.shape), v.dtype) if isinstance(v, Tensor) else None
                                         for v in value)


def _record(model: nn.Module, inputs: CallArgs, training: bool) -> torch.fx.Graph:
    """One recorded forward in train or eval mode, plain conv / linear layers skipped where no op reads what they
    would compute (else, or where that forward fails, every layer computed: a failure is the model's own)."""
    try:
        return _record_once(model, inputs, training, skip_layers=True)
    except (ValuesNeeded, ForwardFailure):
        return _record_once(model, inputs, training, skip_layers=False)


def _record_once(model: nn.Module, inputs: CallArgs, training: bool, skip_layers: bool) -> torch.fx.Graph:
    """One recorded forward in train or eval mode; :class:`ForwardFailure` names the module that failed.

    Every input tensor is a placeholder. Tensors passed directly (``model(x)``, ``model(x=x)``) carry their
    channels on dim 1 as the model input; tensors inside a list or dict (detection's unbatched ``[3, H, W]``
    images) have no known channel dim and are marked ``nested_input`` (untracked: whatever they meet is pinned
    as a channel-sized constant would be)."""
    graph = torch.fx.Graph()
    producers: Dict[int, torch.fx.Node] = {}
    names = {m: n for n, m in model.named_modules()}
    stack = [""]
    tensor_names = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    recorder = _Recorder(graph, producers, lambda: stack[-1], tensor_names)
    direct = {id(v) for v in list(inputs.args) + list(inputs.kwargs.values()) if isinstance(v, Tensor)}
    for i, x in enumerate(tensor_leaves(inputs)):
        if id(x) in producers:  # one tensor passed twice
            continue
        node = graph.placeholder(f"input_{i}")
        _set_meta(node, x, "")
        node.meta["nested_input"] = id(x) not in direct
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
    skipped = [m for m in model.modules() if can_skip(m) and is_prunable_layer(m)] if skip_layers else []
    for module in skipped:  # an instance attribute, deleted after: the class's forward is untouched
        module.forward = _zeros_forward(module, recorder)
    try:
        with training_mode(model, training), torch.no_grad(), recorder:
            out = call_model(model, inputs)
    except Exception as error:  # the innermost module entered and not left is the one that failed
        raise ForwardFailure(describe_module(model, stack[-1]), error) from error
    finally:
        recorder.recording = False
        for handle in handles:
            handle.remove()
        for module in skipped:
            del module.forward
    output = graph.output(recorder.node_for(out))
    output.meta["output_type"] = type(out)  # node_for writes a ModelOutput as a plain dict: the policy needs its type
    return graph


def _zeros_forward(module: nn.Module, recorder: _Recorder) -> Callable:
    """``module``'s forward returning zeros of its output shape (its own forward where the shape is not known)."""
    compute = type(module).forward.__get__(module)

    def forward(*args, **kwargs):
        out = skipped_output(module, args, kwargs)
        if out is None:
            return compute(*args, **kwargs)
        recorder.derived.add(id(out))
        return out
    return forward
