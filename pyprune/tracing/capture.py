"""Capture a model's dataflow as a ``torch.fx.Graph`` whose nodes carry output shapes and module paths.

Two ways, one result: symbolic tracing with torch.fx (fast, sees every branch of the code it traces), and, for models
fx cannot trace or run on the example input, a recording of a real forward pass (:mod:`.record`). Both keep the
layers we have DynamicOps for as opaque ``call_module`` nodes. A recording may miss layers (branches the example
does not take); the capture then says which ones the model's code calls, and keeps the symbolic graph that shows
what they read, so the propagation can keep those channels whole (:mod:`.unseen`).
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.fx
from torch import nn

from ..errors import ConfigError
from .example_inputs import CallArgs, describe_call
from .record import forward_capture
from ..ops.registry import registered_base
from .rules_layers import is_prunable_layer
from .shape_pass import (MAX_SEARCH_SIDE, ForwardFailure, larger_input_that_runs, placeholder_values, run_shapes,
                         shape_text, training_mode)


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
        # a subclass of a known layer whose own forward cannot be served stays opaque too: its groups get fixed
        return registered_base(m) is not None or super().is_leaf_module(m, qualname)

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




def symbolic_capture(model: nn.Module, training: bool = True) -> torch.fx.GraphModule:
    """Trace symbolically (no shapes yet); in train mode by default, so train-only branches such as aux heads are in
    the graph."""
    for module in model.modules():  # decide now: while fx traces, parameters read as proxies and probes fail
        is_prunable_layer(module)
    with training_mode(model, training):
        graph = _PathTracer().trace(model)
    return torch.fx.GraphModule(model, graph)


@dataclass
class Capture:
    """What the propagation walks, and what it must know about layers that ``graph`` never ran.

    ``unseen``: prunable layers the model's code calls that ``graph`` (from ``source``) never ran; ``structure``:
    the symbolic train-mode graph, which shows what they read and feed (None where fx cannot trace); ``hint``: why
    they were not run and which example input runs them; ``note``: why the symbolic graph was not used.
    """
    graph: torch.fx.Graph
    note: str = ""
    unseen: List[str] = field(default_factory=list)
    structure: Optional[torch.fx.Graph] = None
    hint: str = ""
    source: str = "the traced graph"


def capture(model: nn.Module, inputs: CallArgs, tracer: str) -> Capture:
    """Capture with ``tracer`` "fx" | "torch_function" | "auto" (fx, then the real-forward recording), for the call
    ``model(*inputs.args, **inputs.kwargs)``.

    Where the train-mode fx graph does not run on ``inputs`` (a train-only head the input is too small for), the
    eval-mode graph is analysed and the head's layers are ``unseen``. Raises :class:`ConfigError` naming the failing
    layer, and a larger input that runs where one is found, when the model does not run on ``inputs`` at all.
    """
    if tracer == "torch_function":
        return _recorded(model, inputs, note="")
    try:
        gm = symbolic_capture(model)
    except Exception as error:  # fx raises many types for untraceable Python (TraceError, TypeError, ...)
        if tracer == "fx":
            raise
        note = f"torch.fx could not trace the model ({type(error).__name__}: {error}); recorded a real forward"
        return _recorded(model, inputs, note=note)
    try:
        values = placeholder_values(gm, inputs)
    except ValueError as error:  # e.g. forward(*args): the graph's inputs cannot be matched to the call's
        if tracer == "fx":
            raise ConfigError(f"the example input ({describe_call(inputs)}) does not fit the traced forward: "
                              f"{error}") from None
        return _recorded(model, inputs, note=f"the example input does not fit the fx graph's inputs ({error}); "
                                             f"recorded a real forward")
    try:
        run_shapes(gm, values)
        return Capture(gm.graph)
    except ForwardFailure as failure:
        return _eval_graph(model, inputs, gm, failure, tracer)


def _eval_graph(model: nn.Module, inputs: CallArgs, train_gm: torch.fx.GraphModule,
                failure: ForwardFailure, tracer: str) -> Capture:
    """The eval-mode fx graph with shapes, where the train-mode one failed with ``failure``; layers only the train
    mode calls are unseen. Where the eval graph fails too, ``tracer`` "auto" records a real forward instead; the
    model running in no way is a :class:`ConfigError`."""
    try:
        gm = symbolic_capture(model, training=False)
    except Exception as error:  # noqa: BLE001 - code only eval mode runs is not traceable: record instead
        if tracer == "fx":
            raise
        return _recorded(model, inputs, note=f"torch.fx could not trace the model in eval mode "
                                               f"({type(error).__name__}: {error}); recorded a real forward")
    try:
        run_shapes(gm, placeholder_values(gm, inputs))
    except ForwardFailure as eval_failure:
        if tracer != "fx":  # fx's graph may not be the model's code for this input (``if y is not None``, a Proxy)
            try:
                return _recorded(model, inputs, note=f"the torch.fx graph does not run on the example input "
                                                     f"({eval_failure}); recorded a real forward")
            except ConfigError:
                pass
        raise ConfigError(f"the model does not run on the example input ({describe_call(inputs)}): {eval_failure}; "
                          f"{_larger_input_hint(train_gm, inputs)}") from eval_failure
    ran = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    unseen = list(dict.fromkeys(node.target for node in train_gm.graph.nodes if node.op == "call_module"
                                and node.target not in ran and is_prunable_layer(model.get_submodule(node.target))))
    hint = f"in train mode {failure}; {_larger_input_hint(train_gm, inputs)}" if unseen else ""
    return Capture(gm.graph, "", unseen, train_gm.graph, hint, source="the eval-mode graph")


def _recorded(model: nn.Module, inputs: CallArgs, note: str) -> Capture:
    """The recorded forward, with the layers it never ran that the model's code calls (per the symbolic graph)."""
    try:
        recording = forward_capture(model, inputs)
    except ForwardFailure as failure:
        raise ConfigError(f"the model does not run on the example input ({describe_call(inputs)}): "
                          f"{failure}") from failure
    unseen, structure = recording.missed, None
    if unseen:
        try:
            structure = symbolic_capture(model).graph
        except Exception:  # noqa: BLE001 - fx cannot trace it: what the missed layers read stays unknown
            structure = None
    if structure is not None:  # layers the code never calls (in train mode, nor eval for this input) read nothing
        called = {node.target for node in structure.nodes if node.op == "call_module"}
        unseen = [name for name in unseen if name in called]
    hint = f"a train-mode forward failed: {recording.train_failure}" \
        if unseen and recording.train_failure is not None else ""
    return Capture(recording.graph, note, unseen, structure, hint, source="the recorded forward")


def _larger_input_hint(gm: torch.fx.GraphModule, inputs: CallArgs) -> str:
    shapes = larger_input_that_runs(gm, placeholder_values(gm, inputs))
    if shapes is None:
        return f"nor does any input with its spatial dims doubled (up to {MAX_SEARCH_SIDE})"
    return f"an example input of shape {shape_text(shapes)} runs every layer"
