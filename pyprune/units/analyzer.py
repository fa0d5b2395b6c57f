"""ChannelAnalyzer and DefaultDemoInput: the tracer as mmrazor's objects (``TASK_UTILS`` there and here).

``ChannelAnalyzer(demo_input=(1, 3, 224, 224), tracer_type='BackwardTracer').analyze(model)`` returns the model's
units as configs ``{unit name: {'init_args': {'num_channels': n}, 'channels': {...}}}``, the layout
``MutableChannelUnit.init_from_cfg`` and ``ChannelMutator`` read. It runs :func:`pyprune.tracing.trace_channel_units`
(mmrazor's ``BackwardTracer`` maps to pyprune's ``'auto'``: torch.fx, then a recorded real forward).
"""
import functools
from collections.abc import Sequence
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..channels import UnitSpec, ref_to_dict
from ..errors import ConfigError
from ..registry import MODELS, TASK_UTILS
from ..tracing.example_inputs import check_demo_input, describe, model_device, resolve

__all__ = ["ChannelAnalyzer", "DefaultDemoInput", "TRACER_TYPES", "DEFAULT_DEMO_INPUT", "unique_unit_names",
           "unit_config"]

DEFAULT_DEMO_INPUT = (1, 3, 224, 224)
# mmrazor's tracer names and ours -> the ``tracer`` argument of pyprune.tracing.trace_channel_units.
TRACER_TYPES = {"FxTracer": "fx", "fx": "fx", "TorchFunctionTracer": "torch_function",
                "torch_function": "torch_function", "auto": "auto", "BackwardTracer": "auto"}


def check_trace_fn(trace_fn, owner: str) -> None:
    """Refuse a ``trace_fn`` that is not callable, or a ``functools.partial`` that binds ``tracer=``: the parser
    always passes ``tracer=`` from ``tracer_type``, which would silently win over the partial's own."""
    if not callable(trace_fn):
        raise ConfigError(f"{owner}: trace_fn must be callable, got {type(trace_fn).__name__}")
    if isinstance(trace_fn, functools.partial) and "tracer" in trace_fn.keywords:
        raise ConfigError(f"{owner}: trace_fn is a functools.partial with tracer=, which tracer_type would override; "
                          "choose the tracer with tracer_type instead")


@TASK_UTILS.register_module()
class DefaultDemoInput:
    """Makes the example input a model is traced with: ``torch.rand(input_shape)`` on the model's device.

    mmrazor's signature (``input_shape=None`` means ``(1, 3, 224, 224)``; ``training``, ``scope`` and ``kwargs`` are
    kept for configs; mmrazor uses them to run mm-task data preprocessors, which pyprune's plain models do not have).
    ``get_data(model)`` and ``demo_input(model)`` return the tensor.
    """

    default_shape = DEFAULT_DEMO_INPUT

    def __init__(self, input_shape: Optional[Sequence[int]] = None, training: bool = False,
                 scope: Optional[str] = None, kwargs: Optional[Dict] = None):
        shape = tuple(self.default_shape if input_shape is None else input_shape)
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ConfigError(f"DefaultDemoInput: input_shape must be positive ints, got {describe(input_shape)}")
        self.input_shape, self.training, self.scope, self.kwargs = shape, training, scope, dict(kwargs or {})

    def get_data(self, model: Optional[nn.Module] = None, input_shape=None, training=None) -> Tensor:
        """``[*input_shape]`` uniform in [0, 1), on the device of ``model``'s first parameter (cpu without one)."""
        return torch.rand(tuple(input_shape or self.input_shape), device=model_device(model))

    def __call__(self, model: Optional[nn.Module] = None, input_shape=None, training=None) -> Tensor:
        return self.get_data(model, input_shape, training)


def unique_unit_names(specs: List[UnitSpec]) -> List[str]:
    """Each spec's mmrazor-style name; a name met again gets ``#1``, ``#2`` ... (two units at one range)."""
    names, seen = [], set()
    for spec in specs:
        name = spec.name
        if name in seen:
            name = f"{name}#{sum(1 for n in seen if n.split('#')[0] == name)}"
        seen.add(name)
        names.append(name)
    return names


def unit_config(spec: UnitSpec) -> Dict[str, Any]:
    """A spec as a unit config: ``init_args.num_channels`` and the ``channels`` (plus pyprune's ``groups`` and
    ``fixed`` where they apply)."""
    channels: Dict[str, Any] = {"input_related": [ref_to_dict(r) for r in spec.input_related],
                                "output_related": [ref_to_dict(r) for r in spec.output_related]}
    if spec.groups != 1:
        channels["groups"] = spec.groups
    if spec.fixed:
        channels["fixed"] = spec.reason or "fixed"
    return {"init_args": {"num_channels": spec.num_channels}, "channels": channels}


@TASK_UTILS.register_module()
class ChannelAnalyzer:
    """Finds a model's coupled channel groups (mmrazor's ChannelAnalyzer).

    Args:
        demo_input: the example input, in any form :func:`pyprune.tracing.example_inputs.as_call_args` takes (a
            shape, a tensor, a tuple of positional inputs, a list of images, a dict of keyword inputs, a DemoInput
            object or config dict, a callable).
        tracer_type: ``'BackwardTracer'`` (mmrazor's default) / ``'auto'``, ``'FxTracer'`` / ``'fx'``,
            ``'TorchFunctionTracer'``.
        fixed, strict: as :class:`~pyprune.mutators.ChannelMutator` passes them to the tracer.
        trace_fn: the tracer (default :func:`pyprune.tracing.trace_channel_units`).
    """

    def __init__(self, demo_input=DEFAULT_DEMO_INPUT, tracer_type: str = "BackwardTracer", fixed: Sequence = (),
                 strict: bool = False, trace_fn: Optional[Callable[..., List[UnitSpec]]] = None):
        if tracer_type not in TRACER_TYPES:
            raise ConfigError(f"ChannelAnalyzer: unknown tracer_type {tracer_type!r}; known: {sorted(TRACER_TYPES)}")
        check_demo_input(demo_input)
        if trace_fn is not None:
            check_trace_fn(trace_fn, "ChannelAnalyzer")
        self.demo_input, self.tracer_type = demo_input, tracer_type
        self.fixed, self.strict, self.trace_fn = tuple(fixed), bool(strict), trace_fn

    def unit_specs(self, model: nn.Module) -> List[UnitSpec]:
        """The traced units of ``model`` (the model is run once; it is not changed)."""
        trace_fn = self.trace_fn
        if trace_fn is None:
            from ..tracing import trace_channel_units
            trace_fn = trace_channel_units
        return trace_fn(model, resolve(self.demo_input, model), fixed=self.fixed, strict=self.strict,
                        tracer=TRACER_TYPES[self.tracer_type])

    def analyze(self, model: nn.Module) -> Dict[str, Dict[str, Any]]:
        """``{unit name: unit config}`` for every unit, fixed ones included (their ``channels`` say why)."""
        specs = self.unit_specs(model)
        return {name: unit_config(spec) for name, spec in zip(unique_unit_names(specs), specs)}


MODELS.register_module(module=ChannelAnalyzer)  # configs name it from either registry
MODELS.register_module(module=DefaultDemoInput)
