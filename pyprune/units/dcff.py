"""DCFFChannelUnit: dynamic-coded filter fusion's criterion and fused filters for one coupled channel group.

DCFF (Lin et al., "Training Compact CNNs for Image Classification using Dynamic-coded Filter Fusion", 2021) gives
every filter ``i`` of a conv an *inter-similarity distribution* over the layer's filters,

    P[i, j] = softmax_j(-||W_i - W_j||_2 / tau)            (W: the filters flattened to rows, [C, fan_in])

with ``tau = 1 / t``, the inverse of a temperature ``t`` that the algorithm anneals from 1 upwards
(:mod:`pyprune.algorithms.dcff`). A filter
whose distribution differs most from the others' carries the most information of its own; the criterion is that
Kullback-Leibler score, computed as mmrazor computes it (``eps = 1e-7`` against ``log 0``)::

    score[i] = mean_j P[i, j] * (log(P[i, j] + eps) - mean_k log(P[j, k] + eps))

The unit keeps the ``K`` highest-scoring channels and *fuses* them: kept filter ``i`` becomes ``sum_j P[i, j] W_j``
(each conv's own ``P``, set on its :class:`~pyprune.ops.fuse_conv.FuseConv2d`). As ``tau -> 0`` the distributions
become one-hot and the fused filters the plain kept ones, so the subnet drifts into an ordinary pruned network
while training, with no pretrained model and no sparsity loss.

A unit whose channels several convs produce (a residual stream: every block's last conv and the downsample) gives
each conv its own distribution and fusion; the scores are standardised per conv and summed, so the unit keeps one
selection for all of them (BatchNorm, the consumers' input channels and the fused rows line up). Linear layers and
grouped (non-depthwise) convs among the producers are sliced as usual, not fused.
"""
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import ConfigError
from ..ops.fuse_conv import FUSE_CONV_OPS, _FuseConvMixin, can_fuse
from ..ops.selection import prefix_index
from .importance import ImportanceMutableChannelUnit
from .modules import plan_dynamic_conversion, replace_modules
from .registry import register_unit

KL_EPS = 1e-7  # mmrazor's guard against log(0) in the score


def filter_distribution(filters: Tensor, tau: float) -> Tensor:
    """``filters`` ``[C, fan_in]`` -> ``P`` ``[C, C]``: row ``i`` is ``softmax(-dist(W_i, W_j) / tau)`` over ``j``
    (Euclidean distances, float32)."""
    rows = filters.detach().float()
    return torch.softmax(-torch.cdist(rows, rows) / tau, dim=1)


def kl_scores(distribution: Tensor) -> Tensor:
    """``P`` ``[C, C]`` -> ``[C]``: each filter's KL score (see the module docstring); higher = more informative."""
    log_p = (distribution + KL_EPS).log()
    return (distribution * (log_p - log_p.mean(1).unsqueeze(0))).mean(1)  # column j: row j's mean log


def fuse_conversion(model: nn.Module, plan: Dict[str, object]) -> Dict[str, object]:
    """``plan`` ({layer name: its new DynamicOp}) with every plain DynamicConv that can fuse replaced by the
    FuseConv of its rank, built from the model's layer (the same Parameters). Other entries are kept."""
    converted = {}
    for name, op in plan.items():
        fuse = FUSE_CONV_OPS.get(type(op))
        if fuse is not None and can_fuse(op):
            fused = fuse.convert_from(model.get_submodule(name))
            fused.pyprune_name = getattr(op, "pyprune_name", name)
            op = fused
        converted[name] = op
    return converted


@register_unit
class DCFFChannelUnit(ImportanceMutableChannelUnit):
    """A channel unit pruned by dynamic-coded filter fusion (mmrazor's ``DCFFChannelUnit``; module docstring).

    Args: as :class:`~pyprune.units.MutableChannelUnit`, with mmrazor's defaults (``choice_mode='ratio'``).
    ``candidate_choices`` is accepted as mmrazor's signature has it and, as there, not used (a DCFF unit has one
    width, set by the algorithm's target); it must be a list of numbers.

    :attr:`tau` is the divisor of the distances in the distributions (the inverse of the paper's temperature);
    ranking (whenever the choice is set) and :meth:`fuse_filters` use it. Exact ties in the score (once ``tau`` is so low that the distributions are
    one-hot, every score is the same) keep the channels kept now, then the lower index, so the selection does not
    jump while the criterion cannot tell channels apart.
    """

    def __init__(self, num_channels: int, candidate_choices: Sequence = (1.0,), choice_mode: str = "ratio",
                 divisor: int = 1, min_value: int = 1, min_ratio: float = 0.9, **kwargs):
        if isinstance(candidate_choices, (str, bytes)) or not isinstance(candidate_choices, Sequence) or \
                not all(isinstance(c, numbers.Real) and not isinstance(c, bool) for c in candidate_choices):
            raise ConfigError(f"unit {kwargs.get('name')}: candidate_choices must be a list of numbers, got "
                              f"{candidate_choices!r}")
        super().__init__(num_channels, choice_mode, divisor, min_value, min_ratio, **kwargs)
        self.tau = 1.0  # mmrazor's value at iteration 0
        self._distribution_cache = None  # (key, distributions): ranking and fusing in one step share them

    # ---------------------------------------------------------------------------------------------- the model
    def prepare_for_pruning(self, model: nn.Module) -> None:
        """As the base class, with the unit's convs made FuseConvs (mmrazor replaces ``nn.Conv2d`` by
        ``FuseConv2d``)."""
        plan = plan_dynamic_conversion(model, self.related_refs, f"unit {self.name}")
        replace_modules(model, fuse_conversion(model, plan))
        super().prepare_for_pruning(model)

    def fused_layers(self) -> List[Tuple[object, nn.Module]]:
        """``(ref, FuseConv)`` for every producer conv whose filters this unit fuses."""
        return [(ref, module) for ref, module in self.output_layers()
                if isinstance(module, _FuseConvMixin) and can_fuse(module) and ref.expand == 1]

    # ------------------------------------------------------------------------------------------------ criterion
    def set_tau(self, tau: float) -> None:
        """The divisor of the filter distances from now on (a finite number > 0)."""
        if not isinstance(tau, numbers.Real) or isinstance(tau, bool) or not 0.0 < float(tau) < float("inf"):
            raise ConfigError(f"unit {self.name}: tau must be a finite number > 0, got {tau!r}")
        self.tau = float(tau)

    def distributions(self) -> List[Tuple[object, nn.Module, Tensor]]:
        """``(ref, conv, P [end - start, end - start])`` per fused conv, at the current :attr:`tau`. Kept until
        :attr:`tau` or a weight changes (its version counter), so that the ranking and the fusion of one pruning
        step compute the distances once."""
        layers = self.fused_layers()
        key = (self.tau, tuple((id(m.weight), m.weight._version, ref) for ref, m in layers))
        if self._distribution_cache is not None and self._distribution_cache[0] == key:
            return self._distribution_cache[1]
        found = []
        for ref, module in layers:
            rows = ops.layer_kind(module).importance_rows(module)[ref.start:ref.end]
            found.append((ref, module, filter_distribution(rows, self.tau)))
        self._distribution_cache = (key, found)
        return found

    def channel_importance(self) -> Optional[Tensor]:
        total = None
        for _, _, distribution in self.distributions():
            scores = kl_scores(distribution).double()
            scores = (scores - scores.mean()) / scores.std(unbiased=False).clamp_min(1e-12)  # one conv, one say
            total = scores if total is None else total + scores.to(total.device)
        return total

    def _select(self, count: int) -> Tensor:
        with torch.no_grad():
            scores = self.channel_importance() if self._modules else None
            if scores is None:  # no conv to fuse: the first channels, as mmrazor's sequential unit keeps
                return prefix_index(count, self.num_channels, self.groups, self.device)
            kept_now = self.current_mask.to(scores.device)
            chosen = []
            per_group = self.num_channels // self.groups
            for group in range(self.groups):
                block = slice(group * per_group, (group + 1) * per_group)
                # two stable sorts: by score (descending), ties in the order "kept now first, lower index first"
                order = torch.sort((~kept_now[block]).to(torch.int8), stable=True).indices
                order = order[torch.sort(scores[block][order], descending=True, stable=True).indices]
                chosen.append(order[:count // self.groups] + group * per_group)
            return torch.cat(chosen).sort().values.to(self.device)

    # ---------------------------------------------------------------------------------------------------- fusion
    def fuse_filters(self) -> None:
        """Give each fused conv the distributions of its filters at the current :attr:`tau` (all of ``P``:
        the conv reads the rows of whatever channels it keeps); a unit at full width fuses nothing."""
        if self.active_channels == self.num_channels:
            self.clear_fusion()
            return
        for ref, module, distribution in self.distributions():
            module.set_fusion(ref.start, ref.end, distribution)

    def clear_fusion(self) -> None:
        for ref, module in self.fused_layers():
            module.set_fusion(ref.start, ref.end, None)

    def fusion_state(self) -> Dict[str, Tensor]:
        """``{conv name: its block [end - start, end - start] (CPU float32)}`` for the convs this unit fuses now."""
        state = {}
        for ref, module in self.fused_layers():
            block = module.fusion_blocks.get((ref.start, ref.end))
            if block is not None:
                state[ref.name] = block.detach().cpu().float()
        return state

    def check_fusion_state(self, state: Dict[str, Tensor], where: str = "load_fusion_state") -> None:
        """ConfigError unless every entry of ``state`` names one of this unit's fused convs with a block of shape
        ``[end - start, end - start]``."""
        layers = {ref.name: ref for ref, _ in self.fused_layers()}
        unknown = sorted(set(state) - set(layers))
        if unknown:
            raise ConfigError(f"{where}: unit {self.name} fuses no layers named {unknown}; its fused layers are "
                              f"{sorted(layers)}")
        for name, block in state.items():
            size = layers[name].end - layers[name].start
            if not isinstance(block, Tensor) or tuple(block.shape) != (size, size) or not block.is_floating_point():
                what = f"{tuple(block.shape)} {block.dtype}" if isinstance(block, Tensor) else type(block).__name__
                raise ConfigError(f"{where}: unit {self.name}, layer {name}: a fusion block must be a float tensor "
                                  f"[{size}, {size}], got {what}")

    def load_fusion_state(self, state: Dict[str, Tensor], where: str = "load_fusion_state") -> None:
        """Inverse of :meth:`fusion_state`, checked first (:meth:`check_fusion_state`: nothing changes on a
        refusal); the fused convs not named stop fusing."""
        self.check_fusion_state(state, where)
        for ref, module in self.fused_layers():
            module.set_fusion(ref.start, ref.end, state.get(ref.name))

__all__ = ["DCFFChannelUnit", "filter_distribution", "kl_scores", "fuse_conversion", "KL_EPS"]
