"""What a subnet costs: FLOPs and parameters as a function of the kept channel count of every unit.

A unit's count changes the width of the layers it touches, and a layer's cost is bilinear in its two widths
(``in_w * out_w`` for conv / linear weights and multiply-adds, ``w`` for norms and biases, ``w * w`` for layers
whose in and out are one selection such as attention). So the whole model's cost is

    cost(counts) = base + sum over touched layers of (a * in_w * out_w + b * in_w + c * out_w + d)

where ``in_w`` / ``out_w`` are sums of unit counts (times the ref's ``expand``) plus channels no unit covers, and
``base`` is everything no unit changes (fixed layers, pooling, heads). Conv, linear, norm and channel-tensor
coefficients are written out from each layer's shapes, recorded by one forward of the example input; attention
layers are probed (run alone at three widths, see ``_probed_cost``); ``base`` comes from one ``FlopCounterMode``
count of that same forward and ``count_params``. Evaluating a subnet is then arithmetic, with no forward, no re-trace and no export,
and equals ``count_flops`` / ``count_params`` of the exported model (the tests check this on conv, grouped and
depthwise conv, flatten -> linear, concatenation and attention models).

FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-add of conv / matmul / attention, nothing
for norms, activations, pooling or biases, for one forward of the example input (its batch size included). Counting
an exported ``nn.MultiheadAttention`` in eval mode needs ``torch.backends.mha.set_fastpath_enabled(False)``: its fast
path is one native op that ``FlopCounterMode`` does not count at all.
"""
import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import ops
from ..errors import ConfigError
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
        calls = _record_calls(model, inputs, [n for n, layer in layers.items() if isinstance(layer, nn.Module)])
        current = [unit.active_channels for unit in units]
        full = [unit.num_channels for unit in units]
        layer_costs: List[LayerCost] = []
        for name, layer in layers.items():
            in_side, out_side = sides[name]
            cost = _layer_cost(name, layer, in_side, out_side, calls.get(name, []))
            if cost is not None:
                layer_costs.append(cost)
        flops_now = calls["<total flops>"]
        base = Cost(flops=flops_now - sum(layer.cost(current, "flops") for layer in layer_costs),
                    params=count_params(model) - sum(layer.cost(full, "params") for layer in layer_costs))
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


def _record_calls(model: nn.Module, inputs, names: List[str]) -> Dict[str, list]:
    """Per layer name, ``(args, kwargs, output)`` shapes of each call in one eval forward; also the total FLOPs."""
    calls: Dict[str, list] = {name: [] for name in names}

    def shapes(value):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        if isinstance(value, (tuple, list)):
            return type(value)(shapes(v) for v in value)
        return value if isinstance(value, (bool, int, float, type(None))) else None

    def hook_for(name):
        def hook(module, args, kwargs, output):
            if isinstance(module, ops.ATTENTION_TYPES):  # probed later with these very inputs
                calls[name].append((args, kwargs, None, None))
            else:
                calls[name].append((shapes(args), {k: shapes(v) for k, v in kwargs.items()}, shapes(output), None))
        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name), with_kwargs=True) for name in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(model, inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    calls["<total flops>"] = int(counter.get_total_flops())
    return calls


# ------------------------------------------------------------------------------------------ per-layer formulas
def _layer_cost(name: str, layer, in_side: _Side, out_side: _Side, calls: list) -> Optional[LayerCost]:
    """The bilinear cost of one layer (None when it has none: a channel count attribute)."""
    if isinstance(layer, ops.ChannelCount):
        return None
    full_in, full_out = _full_widths(layer)
    in_side.rest += full_in
    out_side.rest += full_out
    if isinstance(layer, ops.ChannelParameter):
        return _one_selection(name, "channel tensor", in_side, out_side,
                              (0, 0, 0, 0), (0, 0, _per_channel_numel(layer), 0))
    if isinstance(layer, nn.modules.conv._ConvNd):
        return _conv_cost(name, layer, in_side, out_side, calls)
    if isinstance(layer, nn.Linear):
        tokens = sum(math.prod(args[0]) // layer.in_features for args, _, _, _ in calls)
        bias = float(layer.bias is not None)
        return LayerCost(name, "linear", in_side, out_side, (2.0 * tokens, 0, 0, 0), (1.0, 0, bias, 0))
    if isinstance(layer, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
        affine = float(getattr(layer, "weight", None) is not None) + float(getattr(layer, "bias", None) is not None)
        return _one_selection(name, "norm", in_side, out_side, (0, 0, 0, 0), (0, 0, affine, 0))
    if isinstance(layer, ops.ATTENTION_TYPES):
        return _probed_cost(name, layer, in_side, out_side, calls)
    raise BudgetError(f"layer {name!r} ({type(layer).__name__}): no cost model for this layer type")


def _full_widths(layer) -> Tuple[int, int]:
    """(input, output) channels of the full layer, as its layer kind says (0, 0 for layers pyprune cannot prune)."""
    kind = ops.layer_kind(layer)
    if kind is None:
        return 0, 0
    out_channels, in_channels = kind.channel_counts(layer)
    return in_channels, out_channels


def _one_selection(name, kind, in_side, out_side, flops, params) -> LayerCost:
    """A layer whose in and out channels are one selection: its width is the side that units cover."""
    side = out_side if out_side.parts else in_side
    return LayerCost(name, kind, side, side, flops, params)


def _per_channel_numel(layer) -> float:
    tensor = layer.tensor
    return tensor.numel() / layer.num_channels if isinstance(tensor, nn.Parameter) else 0.0


def _conv_cost(name, conv, in_side, out_side, calls) -> LayerCost:
    """FLOPs ``2 * N * prod(out spatial) * out * (in / groups) * prod(kernel)``; params ``out * in / groups *
    prod(kernel)`` + bias. A depthwise conv's active groups follow its width, so it costs per channel."""
    kernel = math.prod(conv.kernel_size)
    positions = sum(_positions(out, conv) for _, _, out, _ in calls)
    bias = float(conv.bias is not None)
    if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
        return _one_selection(name, "depthwise conv", in_side, out_side, (0, 0, 2.0 * positions * kernel, 0),
                              (0, 0, kernel + bias, 0))
    per_weight = kernel / conv.groups
    return LayerCost(name, "conv", in_side, out_side, (2.0 * positions * per_weight, 0, 0, 0),
                     (per_weight, 0, bias, 0))


def _positions(out_shape, conv) -> int:
    """Batch x spatial positions of a conv output (``[N, C, *S]`` or unbatched ``[C, *S]``)."""
    spatial = len(conv.kernel_size)
    batched = len(out_shape) == spatial + 2
    return (out_shape[0] if batched else 1) * math.prod(out_shape[-spatial:])


def _probed_cost(name, layer, in_side, out_side, calls) -> LayerCost:
    """Attention layers: run a copy alone at up to three widths (balanced over heads) on the recorded inputs, the
    tensors carrying the channels (last dim = the recorded active width) replaced by random ones of the probe width,
    under ``FlopCounterMode``; export the copy to count parameters; fit ``a w^2 + c w + d`` through the points.

    Measured rather than written out because what ``FlopCounterMode`` counts for attention depends on the
    ``scaled_dot_product_attention`` backend (the CPU kernels are not counted); the fit is exact because the cost
    of attention is quadratic in its width.
    """
    kind = ops.layer_kind(layer)
    width, heads = kind.channel_counts(layer)[0], kind.selection_groups(layer)
    device = ops_device(layer)
    active = layer.active_out_channels
    per_head = width // heads
    widths = sorted({heads * k for k in (per_head, max(1, per_head // 2), 1)}, reverse=True)
    flops, params = [], []
    for w in widths:
        probe = copy.deepcopy(layer).eval()
        probe.set_out_index(None if w == width else _balanced_prefix(width, w, heads, device))
        total = 0
        for args, kwargs, _, _ in calls:
            resized = _resized_inputs(args, kwargs, active, w)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                probe(*resized[0], **resized[1])
            total += counter.get_total_flops()
        flops.append(float(total))
        params.append(float(count_params(probe.export())))
    return _one_selection(name, "attention", in_side, out_side, _fit_quadratic(widths, flops),
                          _fit_quadratic(widths, params))


def _resized_inputs(args, kwargs, active: int, width: int):
    """``(args, kwargs)`` with every float tensor whose last dim is ``active`` replaced by a random one whose last
    dim is ``width`` (the same replacement for the same tensor, so ``query is key is value`` still holds)."""
    replaced = {}

    def resize(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape[-1] == active:
            if id(value) not in replaced:
                replaced[id(value)] = torch.randn(*value.shape[:-1], width, dtype=value.dtype, device=value.device)
            return replaced[id(value)]
        return value
    return tuple(resize(a) for a in args), {k: resize(v) for k, v in kwargs.items()}


def ops_device(layer) -> torch.device:
    return next((p.device for p in layer.parameters()), torch.device("cpu"))


def _balanced_prefix(width: int, count: int, groups: int, device) -> torch.Tensor:
    """The first ``count / groups`` channels of each of ``groups`` equal blocks: sorted int64 ``[count]``."""
    starts = torch.arange(groups, device=device) * (width // groups)
    return (starts.unsqueeze(1) + torch.arange(count // groups, device=device)).reshape(-1)


def _fit_quadratic(xs: List[int], ys: List[float]) -> Tuple[float, float, float, float]:
    """``(a, 0, c, d)`` with ``a x^2 + c x + d`` through the points (lower degree when there are fewer)."""
    degree = min(len(xs), 3) - 1
    matrix = torch.tensor([[x ** p for p in range(degree, -1, -1)] for x in xs], dtype=torch.float64)
    solution = torch.linalg.lstsq(matrix, torch.tensor(ys, dtype=torch.float64).unsqueeze(1)).solution.flatten()
    coefficients = [0.0] * (3 - degree - 1) + solution.tolist()
    a, c, d = coefficients
    return a, 0.0, c, d


__all__ = ["Cost", "CostModel", "LayerCost", "METRICS", "example_inputs_for", "subnet_cost"]
