"""What a subnet costs: FLOPs and parameters as a function of the kept channel count of every unit.

A unit's count changes the width of the layers it touches, and a layer's cost is bilinear in its two widths
(``in_w * out_w`` for conv / linear weights and multiply-adds, ``w`` for norms and biases, ``w * w`` for layers
whose in and out are one selection such as attention). So the whole model's cost is

    cost(counts) = base + sum over touched layers of (a * in_w * out_w + b * in_w + c * out_w + d)

where ``in_w`` / ``out_w`` are sums of unit counts (times the ref's ``expand``) plus channels no unit covers, and
``base`` is everything no unit changes (fixed layers, pooling, heads). Each layer's coefficients are its layer
kind's answer (``pyprune.ops.layer_kind(layer).cost_terms(layer, calls)``, see ``pyprune.ops.cost_terms``) from the
shapes of its calls in one forward of the example input: the budget knows no layer type itself, so a kind
registered in ``pyprune.ops.DYNAMIC_OPS`` (or a layer with its own forward served as one) is costed with no change
here. A parameter several layers hold (a tied embedding) is counted once; one no export keeps (a switchable BN's
sets for its other widths, ``supernet_only_parameters``) not at all. ``base`` comes from one
``FlopCounterMode`` count of that same forward and ``count_params``. Evaluating a subnet is then arithmetic, with no
forward, no re-trace and no export, and equals ``count_flops`` / ``count_params`` of the exported model (the tests
check this on conv, grouped and depthwise conv, flatten -> linear, concatenation, attention and served-layer
models).

FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-add of conv / matmul / attention, nothing
for norms, activations, pooling or biases, for one forward of the example input (its batch size included). Counting
an exported ``nn.MultiheadAttention`` in eval mode needs ``torch.backends.mha.set_fastpath_enabled(False)``: its fast
path is one native op that ``FlopCounterMode`` does not count at all.
"""
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import ops
from ..errors import ConfigError
from ..ops.cost_terms import LayerCall
from ..mutators.parse import demo_inputs
from ..mutators.summary import count_params
from ..tracing.example_inputs import CallArgs, as_call_args, call_model
from ..units.modules import get_layer
from .errors import BudgetError

METRICS = ("flops", "params")


@dataclass(frozen=True)
class Cost:
    """FLOPs (one forward of the example input) and parameter count of a model or subnet."""
    flops: float
    params: float

    def __getitem__(self, metric: str) -> float:
        if metric not in METRICS:
            raise KeyError(f"unknown cost metric {metric!r}; known: {METRICS}")
        return getattr(self, metric)

    def fraction_of(self, full: "Cost") -> Dict[str, float]:
        return {m: self[m] / full[m] if full[m] else 1.0 for m in METRICS}


@dataclass
class _Side:
    """The channels on one side (in or out) of a layer: ``rest`` + sum of ``expand * count[unit]`` over parts."""
    parts: List[Tuple[int, int]]  # (unit position, expand)
    rest: int

    def width(self, counts: Sequence[int]) -> int:
        return self.rest + sum(expand * counts[pos] for pos, expand in self.parts)


@dataclass
class LayerCost:
    """One layer whose cost depends on unit counts: per metric ``a * in * out + b * in + c * out + d``."""
    name: str
    kind: str
    in_side: _Side
    out_side: _Side
    flops: Tuple[float, float, float, float]
    params: Tuple[float, float, float, float]

    def units(self) -> List[int]:
        return sorted({pos for pos, _ in self.in_side.parts + self.out_side.parts})

    def cost(self, counts: Sequence[int], metric: str) -> float:
        a, b, c, d = getattr(self, metric)
        w_in, w_out = self.in_side.width(counts), self.out_side.width(counts)
        return a * w_in * w_out + b * w_in + c * w_out + d


def example_inputs_for(model: nn.Module, mutator, example_inputs=None) -> CallArgs:
    """The call ``(args, kwargs)`` one counted forward runs, tensors on the model's device: ``example_inputs`` in any
    form :func:`pyprune.tracing.example_inputs.as_call_args` takes (a tensor, a shape, a tuple of positional
    inputs, a list of images, a dict of keyword inputs, a DemoInput or callable) or, when it is None, the mutator's
    ``parse_cfg`` demo input."""
    if example_inputs is None:
        if "demo_input" not in mutator.parse_cfg:
            raise BudgetError("counting FLOPs needs an example input: pass example_inputs= (the mutator was built "
                              "from a config and has no demo_input)")
        example_inputs = demo_inputs(mutator.parse_cfg, model)
    try:
        return as_call_args(example_inputs, model=model)
    except ConfigError as error:
        raise BudgetError(f"example_inputs: {error}") from None


class CostModel:
    """FLOPs and parameters of ``model`` at any kept channel count of the mutator's units.

    Build it with :meth:`from_model` (one forward of ``example_inputs``). ``counts`` everywhere is a sequence
    aligned with ``units`` (``mutator.units``: fixed units keep ``num_channels``) or a dict ``{unit name: count}``
    (units not named take their current count).
    """

    def __init__(self, units, layers: List[LayerCost], base: Cost):
        self.units = list(units)
        self.positions = {unit.name: pos for pos, unit in enumerate(self.units)}
        self.layers = layers
        self.base = base
        self._layers_of_unit: Dict[int, List[LayerCost]] = {}
        for layer in layers:
            for pos in layer.units():
                self._layers_of_unit.setdefault(pos, []).append(layer)

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_model(cls, model: nn.Module, mutator, example_inputs=None) -> "CostModel":
        """Record the shapes of every layer a unit touches in one eval-mode forward (at the current choices) and
        count that forward's FLOPs; the model is not changed."""
        units = list(mutator.units)
        if not units:
            raise BudgetError("the ChannelMutator is not prepared; call prepare_from_supernet(model) first")
        inputs = example_inputs_for(model, mutator, example_inputs)
        sides = _layer_sides(units)
        layers = {name: get_layer(model, ref, f"unit {unit}") for name, (ref, unit) in _first_refs(units).items()}
        kinds = {name: _kind_of(name, layer) for name, layer in layers.items()}
        calls, flops_now = _record_calls(model, inputs, {n: kinds[n] for n, layer in layers.items()
                                                         if isinstance(layer, nn.Module)})
        current = [unit.active_channels for unit in units]
        full = [unit.num_channels for unit in units]
        counted: set = set()  # ids of the parameters a layer already counts (tied tensors are counted once)
        layer_costs = [_layer_cost(name, layer, kinds[name], *sides[name], calls.get(name, []), counted)
                       for name, layer in layers.items()]
        base = Cost(flops=flops_now - sum(layer.cost(current, "flops") for layer in layer_costs),
                    params=count_params(model) - _supernet_only_params(model)
                    - sum(layer.cost(full, "params") for layer in layer_costs))
        return cls(units, layer_costs, base)

    # ------------------------------------------------------------------------------------------------- counts
    def as_counts(self, counts=None) -> List[int]:
        """A count list aligned with ``units`` from None (current), a list, or a dict of some units' counts."""
        if counts is None:
            return [unit.active_channels for unit in self.units]
        if isinstance(counts, Mapping):
            unknown = sorted(set(counts) - set(self.positions))
            if unknown:
                raise BudgetError(f"unknown unit names {unknown}")
            return [int(counts.get(unit.name, unit.active_channels)) for unit in self.units]
        counts = [int(c) for c in counts]
        if len(counts) != len(self.units):
            raise BudgetError(f"expected {len(self.units)} counts (one per unit), got {len(counts)}")
        return counts

    @property
    def full_counts(self) -> List[int]:
        return [unit.num_channels for unit in self.units]

    def cost(self, counts=None) -> Cost:
        """Cost of the subnet that keeps ``counts`` channels (current choices when None)."""
        counts = self.as_counts(counts)
        return Cost(*(round(self.base[m] + sum(layer.cost(counts, m) for layer in self.layers)) for m in METRICS))

    def full(self) -> Cost:
        """Cost of the unpruned model (every unit at ``num_channels``)."""
        return self.cost(self.full_counts)

    def unit_cost(self, pos: int, counts: Sequence[int], metric: str) -> float:
        """Cost of the layers unit ``pos`` touches, at ``counts`` (the rest of the model does not depend on it)."""
        return sum(layer.cost(counts, metric) for layer in self._layers_of_unit.get(pos, []))

    def channel_cost(self, pos: int, counts: Sequence[int], low: int, metric: str) -> float:
        """Average ``metric`` one channel of unit ``pos`` costs between ``low`` kept channels and ``counts[pos]``,
        the other units at ``counts``: ``(cost(counts) - cost(counts with unit pos at low)) / (counts[pos] - low)``."""
        high = counts[pos]
        if high <= low:
            return 0.0
        reduced = list(counts)
        reduced[pos] = low
        return (self.unit_cost(pos, counts, metric) - self.unit_cost(pos, reduced, metric)) / (high - low)


def subnet_cost(model: nn.Module, mutator, example_inputs=None) -> Cost:
    """FLOPs (``FlopCounterMode`` of one forward of the dynamic model) and parameters of ``model`` at its current
    choices, without exporting it: what ``count_flops`` / ``count_params`` of ``mutator.export(model)`` give."""
    return CostModel.from_model(model, mutator, example_inputs).cost()


# -------------------------------------------------------------------------------------------- layer structure
def _first_refs(units) -> Dict[str, Tuple[object, str]]:
    """layer name -> (a ref naming it, its unit's name), in model order of first appearance."""
    refs = {}
    for unit in units:
        for ref in unit.output_related + unit.input_related:
            refs.setdefault(ref.name, (ref, unit.name))
    return refs


def _layer_sides(units) -> Dict[str, Tuple[_Side, _Side]]:
    """layer name -> (in side, out side): which unit covers which channels (``rest`` filled in later)."""
    sides: Dict[str, Tuple[_Side, _Side]] = {}
    covered: Dict[Tuple[str, bool], int] = {}
    for pos, unit in enumerate(units):
        for ref in unit.output_related + unit.input_related:
            in_side, out_side = sides.setdefault(ref.name, (_Side([], 0), _Side([], 0)))
            side = out_side if ref.is_output_channel else in_side
            side.parts.append((pos, getattr(ref, "expand", 1)))
            covered[(ref.name, ref.is_output_channel)] = covered.get((ref.name, ref.is_output_channel), 0) + \
                ref.end - ref.start
    for name, (in_side, out_side) in sides.items():
        in_side.rest, out_side.rest = -covered.get((name, False), 0), -covered.get((name, True), 0)
    return sides


def _record_calls(model: nn.Module, inputs, kinds: Dict[str, type]) -> Tuple[Dict[str, List[LayerCall]], int]:
    """(per layer name the :class:`LayerCall` shapes of each of its calls in one eval forward, that forward's
    total FLOPs)."""
    calls: Dict[str, List[LayerCall]] = {name: [] for name in kinds}

    def hook_for(name, kind):
        def hook(module, args, kwargs, output):
            calls[name].append(LayerCall.record(args, kwargs, output, _active_widths(module, kind)))
        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name, kind), with_kwargs=True)
               for name, kind in kinds.items()]
    names = {id(model.get_submodule(name)): name for name in kinds}

    def read_call(layer, args, kwargs, output):  # a layer whose weight the code around it reads (BEiT's qkv)
        name = names.get(id(layer))
        if name is not None:
            x = args[0] if args else kwargs.get("input")
            calls[name].append(LayerCall.record((x,), {}, output, _active_widths(layer, kinds[name])))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter, ops.ReadCalls(model, read_call):
            call_model(model, inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return calls, int(counter.get_total_flops())


def _active_widths(layer, kind) -> Tuple[int, int]:
    """(output, input) widths ``layer`` runs at: a DynamicOp's active ones, a plain layer's full ones."""
    if hasattr(layer, "active_out_channels"):
        return layer.active_out_channels, layer.active_in_channels
    return kind.channel_counts(layer)


def _supernet_only_params(model: nn.Module) -> int:
    """Parameters the dynamic layers hold that no export keeps (a switchable BN's other widths' sets), counted
    once: ``count_params(model)`` includes them, the exported model does not."""
    seen = {}
    for module in model.modules():
        for parameter in getattr(module, "supernet_only_parameters", lambda: [])():
            seen[id(parameter)] = parameter.numel()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------------ per layer
def _kind_of(name: str, layer) -> type:
    kind = ops.layer_kind(layer)
    if kind is None:
        raise BudgetError(f"layer {name!r} ({type(layer).__name__}): no cost model, as pyprune knows no layer kind "
                          f"for this type (see docs/ARCHITECTURE.md, 'How to add a layer type')")
    return kind


def _layer_cost(name: str, layer, kind: type, in_side: _Side, out_side: _Side, calls: List[LayerCall],
                counted: set) -> LayerCost:
    """The bilinear cost of one layer, as its kind gives it; parameters in ``counted`` (held by a layer costed
    before) are left out, and this layer's are added to it."""
    out_full, in_full = kind.channel_counts(layer)
    in_side.rest += in_full
    out_side.rest += out_full
    terms = kind.cost_terms(layer, calls)
    params = [0.0, 0.0, 0.0, 0.0]
    for parameter, count in terms.params:
        if id(parameter) not in counted:
            counted.add(id(parameter))
            params = [total + term for total, term in zip(params, count)]
    if kind.shares_selection(layer):  # one selection: its width is the side that units cover
        in_side = out_side = out_side if out_side.parts else in_side
    return LayerCost(name, kind.__name__, in_side, out_side, tuple(terms.flops), tuple(params))


__all__ = ["Cost", "CostModel", "LayerCost", "METRICS", "example_inputs_for", "subnet_cost"]
