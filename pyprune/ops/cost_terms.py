"""What a layer costs, in the form the budget's exact cost model reads: the values of the ``cost_terms`` layer-kind
fact and the formulas several kinds share.

A layer's FLOPs and each of its parameters' element counts are bilinear in its two active widths ``in`` and ``out``
(``in * out`` for a conv / linear weight and its multiply-adds, ``out`` for a bias or a norm's affine ``[C]``,
``w * w`` for attention, whose in and out are one width ``w``)::

    Bilinear(a, b, c, d)  =  a * in * out  +  b * in  +  c * out  +  d

A kind answers ``cost_terms(module, calls) -> CostTerms``: the FLOPs of ``calls`` (the layer's calls in one forward
of the example input, recorded as :class:`LayerCall` shapes) and the element count of every parameter the layer
holds (per parameter, so that a tensor two layers hold, a tied embedding, is counted once). For a kind whose in and
out are one selection (``shares_selection``), ``in == out``. FLOPs are what ``torch.utils.flop_counter.
FlopCounterMode`` counts: 2 per multiply-add of conv / matmul / attention, nothing for norms, activations, pooling,
lookups or biases.
"""
import math
from typing import Dict, Iterable, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["Bilinear", "ParameterCount", "CostTerms", "TensorSpec", "LayerCall", "map_nested", "parameter_counts",
           "per_channel_parameters", "matmul_cost_terms", "NO_COST"]


class Bilinear(NamedTuple):
    """``a * in * out + b * in + c * out + d`` in a layer's active input / output widths."""
    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    d: float = 0.0

    def at(self, in_width: float, out_width: float) -> float:
        return self.a * in_width * out_width + self.b * in_width + self.c * out_width + self.d


class ParameterCount(NamedTuple):
    """One parameter a layer holds (the Parameter object itself: identity finds tensors layers share) and its
    element count at the active widths."""
    parameter: Tensor
    count: Bilinear


class CostTerms(NamedTuple):
    """A layer's FLOPs over its recorded calls and its parameters' element counts, as bilinear forms."""
    flops: Bilinear
    params: Tuple[ParameterCount, ...]


NO_COST = CostTerms(Bilinear(), ())


class TensorSpec(NamedTuple):
    """A tensor as a recorded call keeps it: shape, dtype and device (no values, so recording a forward keeps no
    activations alive). One tensor passed twice (``query is key is value``) is one spec object."""
    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class LayerCall(NamedTuple):
    """One call of a layer: its positional / keyword arguments and output with every tensor a :class:`TensorSpec`
    (tuples, lists and dicts kept, other values kept when they are plain bool / int / float / str / None, else None),
    and the layer's ``active`` (output, input) widths during the call."""
    args: tuple
    kwargs: Dict[str, object]
    output: object
    active: Tuple[int, int]

    @classmethod
    def record(cls, args, kwargs, output, active: Tuple[int, int]) -> "LayerCall":
        specs: Dict[int, TensorSpec] = {}

        def spec(value):
            if isinstance(value, Tensor):
                if id(value) not in specs:
                    specs[id(value)] = TensorSpec(tuple(value.shape), value.dtype, value.device)
                return specs[id(value)]
            return value if isinstance(value, (bool, int, float, str, type(None))) else None
        return cls(map_nested(tuple(args), spec), map_nested(dict(kwargs), spec), map_nested(output, spec),
                   (int(active[0]), int(active[1])))

    def first_input(self) -> Optional[TensorSpec]:
        """The first tensor among the arguments (positional first): a layer's input."""
        return next((v for v in list(self.args) + list(self.kwargs.values()) if isinstance(v, TensorSpec)), None)


def map_nested(value, leaf):
    """``value`` with ``leaf`` applied to everything in it that is not a list, tuple or dict (a :class:`TensorSpec`
    is a leaf), the containers rebuilt (tuple subclasses as tuples)."""
    if isinstance(value, list):
        return [map_nested(v, leaf) for v in value]
    if isinstance(value, tuple) and not isinstance(value, TensorSpec):
        return tuple(map_nested(v, leaf) for v in value)
    if isinstance(value, dict):
        return {k: map_nested(v, leaf) for k, v in value.items()}
    return leaf(value)


def parameter_counts(module: nn.Module, counts: Mapping[str, Bilinear]) -> Tuple[ParameterCount, ...]:
    """``counts`` keyed by parameter path relative to ``module`` (``"weight"``, ``"out_proj.bias"``) as
    :class:`ParameterCount` of the Parameter objects; names of absent parameters (``bias=False``) are skipped."""
    found = []
    for name, count in counts.items():
        owner, _, attribute = name.rpartition(".")
        parameter = (module.get_submodule(owner) if owner else module)._parameters.get(attribute)
        if parameter is not None:
            found.append(ParameterCount(parameter, count))
    return tuple(found)


def per_channel_parameters(module: nn.Module, channels: int, skip: Iterable[str] = ()) -> Dict[str, Bilinear]:
    """``module``'s own parameters (not in ``skip``) whose dim 0 is its ``channels`` output channels (a bias, a
    norm's affine ``[C]``, a served layer's extra gain ``[C, 1, 1, 1]``), each ``numel / C`` per output channel: the
    same rule by which a layer with its own forward serves such tensors at the kept channels."""
    skip = set(skip)
    return {name: Bilinear(c=float(tensor.numel() // channels)) for name, tensor in module._parameters.items()
            if name not in skip and tensor is not None and tensor.dim() >= 1 and tensor.shape[0] == channels}


def matmul_cost_terms(module: nn.Module, calls: Sequence[LayerCall], out_channels: int) -> CostTerms:
    """A layer multiplying the last dim of its input ``[*, in]`` by an ``in x out`` weight (``nn.Linear``, GPT-2's
    ``Conv1D``): ``2 * tokens * in * out`` FLOPs (tokens: the input's other dims, summed over calls), ``in * out``
    weight elements, and per output channel a bias (and any other per-output parameter)."""
    tokens = sum(math.prod(call.first_input().shape[:-1]) for call in calls)
    counts = {"weight": Bilinear(a=1.0), **per_channel_parameters(module, out_channels, skip=("weight",))}
    return CostTerms(Bilinear(a=2.0 * tokens), parameter_counts(module, counts))
