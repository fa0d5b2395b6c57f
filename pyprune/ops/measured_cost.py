"""Cost terms measured rather than written out: a copy of the layer run alone at a few widths, the counts fitted.

For layers whose FLOPs cannot be written from shapes alone: what ``FlopCounterMode`` counts for attention depends on
the ``scaled_dot_product_attention`` backend (the CPU kernels are not counted). The layer's in and out must be one
selection of width ``w`` (``shares_selection``); its FLOPs and each parameter's element count are then at most
quadratic in ``w``, so a fit through three widths is exact.
"""
import copy
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .cost_terms import Bilinear, CostTerms, LayerCall, TensorSpec, map_nested, parameter_counts
from .selection import prefix_index

__all__ = ["measured_cost_terms"]


def measured_cost_terms(kind: type, module: nn.Module, calls: Sequence[LayerCall]) -> CostTerms:
    """``kind``'s cost terms of ``module`` (plain or dynamic; not changed) by measurement: a copy at up to three
    widths balanced over its ``selection_groups`` (all, half and one channel per group) runs every recorded call
    under ``FlopCounterMode``, its tensors with the call's active width on the last dim replaced by random ones of
    the probe width, and is exported to count its parameters; ``a w^2 + c w + d`` is fitted through the points."""
    from torch.utils.flop_counter import FlopCounterMode

    width, groups = kind.channel_counts(module)[0], kind.selection_groups(module)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    per_group = width // groups
    widths = sorted({groups * k for k in (per_group, max(1, per_group // 2), 1)}, reverse=True)
    flops: List[float] = []
    params: Dict[str, List[float]] = {}
    for w in widths:
        probe = copy.deepcopy(module).eval()
        if not hasattr(probe, "set_out_index"):  # a plain layer: its DynamicOp, sharing the copy's tensors
            probe = kind.convert_from(probe)
        probe.set_out_index(prefix_index(w, width, groups, device))
        total = 0
        for call in calls:
            args, kwargs = _inputs_at(call, w)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                probe(*args, **kwargs)
            total += counter.get_total_flops()
        flops.append(float(total))
        for name, parameter in probe.export().named_parameters():
            params.setdefault(name, []).append(float(parameter.numel()))
    counts = {name: _fit_quadratic(widths, ys) for name, ys in params.items()}
    return CostTerms(_fit_quadratic(widths, flops), parameter_counts(module, counts))


def _inputs_at(call: LayerCall, width: int) -> Tuple[tuple, dict]:
    """The call's ``(args, kwargs)`` as tensors: floating tensors whose last dim is the call's active width get the
    last dim ``width`` (random values), other tensors their recorded shape (random floats, zero integers / bools);
    one spec gives one tensor, so ``query is key is value`` still holds."""
    active = call.active[0]
    made: Dict[int, Tensor] = {}

    def build(value):
        if not isinstance(value, TensorSpec):
            return value
        if id(value) not in made:
            shape = value.shape
            if value.dtype.is_floating_point:
                if shape and shape[-1] == active:
                    shape = shape[:-1] + (width,)
                made[id(value)] = torch.randn(shape, dtype=value.dtype, device=value.device)
            else:
                made[id(value)] = torch.zeros(shape, dtype=value.dtype, device=value.device)
        return made[id(value)]
    return map_nested(call.args, build), map_nested(call.kwargs, build)


def _fit_quadratic(xs: List[int], ys: List[float]) -> Bilinear:
    """``a x^2 + c x + d`` through the points (lower degree when there are fewer), as ``Bilinear(a, 0, c, d)`` of a
    layer whose in and out are one width ``x``."""
    degree = min(len(xs), 3) - 1
    matrix = torch.tensor([[x ** p for p in range(degree, -1, -1)] for x in xs], dtype=torch.float64)
    solution = torch.linalg.lstsq(matrix, torch.tensor(ys, dtype=torch.float64).unsqueeze(1)).solution.flatten()
    a, c, d = [0.0] * (3 - degree - 1) + solution.tolist()
    return Bilinear(a, 0.0, c, d)
