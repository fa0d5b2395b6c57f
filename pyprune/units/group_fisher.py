"""GroupFisherChannelUnit: the Fisher information of a channel mask, per unit of cost (mmrazor's GroupFisher).

GroupFisher (Liu et al., "Group Fisher Pruning for Practical Network Compression", ICML 2021) asks how much the loss
would grow if one channel of a coupled group were masked out. Put a mask ``m`` (all ones) on the unit's channels
where its consumer layers read them; the gradient of the loss with respect to ``m[c]`` for sample ``n`` is

    g[n, c] = sum over the unit's consumer conv / linear layers (and over their calls) of
              sum over positions of  x[n, c, ...] * dL/dx[n, c, ...]

where ``x`` is the layer's input at channel ``c`` and ``dL/dx`` the gradient flowing back through *that* layer only.
The Fisher information of the channel is ``sum over n of g[n, c] ** 2``, accumulated over the batches between two
pruning steps and divided by what one channel of the unit costs (``normalization_type``): the FLOPs it saves
(``'flops'``, as :class:`pyprune.budget.CostModel` counts them), the memory of its output activations (``'act'``:
the positions of the output feature maps of the unit's producing conv / linear layers per sample), or nothing
(``'none'``). The channel with the smallest normalised Fisher over all units is the one to prune.

How the activations are seen: while recording (:meth:`GroupFisherChannelUnit.start_record_fisher_info`), every
consumer layer gets a forward pre-hook that hands the layer a view of its input and hooks that view's gradient, so
the gradient is this layer's share only (a tensor feeding a residual add and a conv gets both gradients on the
tensor itself). The hook reduces ``x * grad`` to ``[batch, active channels]`` at once and scatters it to the unit's
channels with the layer's input index of that forward, so it works in gather and in compact training mode alike and
keeps no activation alive. Pruned channels have no input, hence no Fisher: :meth:`importance` reports them as
``+inf`` (never the minimum).
"""
import math
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import ops
from ..errors import ConfigError
from .l1 import L1MutableChannelUnit
from .modules import module_channel_count
from .registry import register_unit

NORMALIZATION_TYPES = ("flops", "act", "none")
_CONV_KINDS = (ops.DynamicConv1d, ops.DynamicConv2d, ops.DynamicConv3d)
# mmrazor's scales (cost in GFLOPs / in millions of activation values): they keep the numbers readable and do not
# change which channel is the least important.
_FLOPS_SCALE, _ACT_SCALE = 1e9, 1e6


def _kind(module):
    kind = ops.layer_kind(module)
    return kind if isinstance(kind, type) else None


def is_conv_or_linear(module) -> bool:
    """A conv (any rank) or linear layer: the layers whose inputs / outputs GroupFisher reads."""
    kind = _kind(module)
    return kind is not None and issubclass(kind, _CONV_KINDS + (ops.DynamicLinear,))


def mask_gradient(x: Tensor, grad: Tensor, is_conv: bool, spatial_dims: int) -> Tensor:
    """Per sample and channel, ``sum(x * grad)`` over the positions: float32 ``[B, K]``.

    conv: ``x`` ``[B, K, *spatial]`` (or unbatched ``[K, *spatial]``); linear: ``[B, *, K]`` (dim 0 is the batch) or
    ``[K]``. The dot product runs as a batched contraction, without a product tensor the size of ``x``.
    """
    if x.dtype in (torch.float16, torch.bfloat16):  # accumulate in float32, as autocast training would want
        x, grad = x.float(), grad.float()
    if is_conv:
        if x.dim() == spatial_dims + 1:
            x, grad = x.unsqueeze(0), grad.unsqueeze(0)
        result = torch.einsum("bks,bks->bk", x.flatten(2), grad.flatten(2))
    else:
        if x.dim() == 1:
            x, grad = x.unsqueeze(0), grad.unsqueeze(0)
        width = x.shape[-1]
        result = torch.einsum("btk,btk->bk", x.reshape(x.shape[0], -1, width), grad.reshape(grad.shape[0], -1, width))
    return result.float()


class _Hook:
    """A recording hook on one layer of a unit. It holds the unit weakly and acts only on the very module the unit
    is bound to, so a deep copy of the model (an EMA copy, an export) carries it inert; pickled, it is inert too."""

    def __init__(self, unit: "GroupFisherChannelUnit", name: str):
        self._unit = weakref.ref(unit)
        self.name = name

    def __getstate__(self):
        return {"name": self.name}

    def __setstate__(self, state) -> None:
        self._unit, self.name = None, state["name"]

    def owner(self, module) -> Optional["GroupFisherChannelUnit"]:
        unit = None if self._unit is None else self._unit()
        if unit is None or not unit.recording or unit._modules.get(self.name) is not module:
            return None
        return unit


class _InputHook(_Hook):
    """Forward pre-hook on a consumer layer: the layer gets a view of its input whose gradient is recorded."""

    def __call__(self, module, args):
        unit = self.owner(module)
        if unit is None or not args or not torch.is_grad_enabled():
            return None
        x = args[0]
        if not isinstance(x, Tensor) or not x.requires_grad:
            return None  # nothing upstream learns: no gradient will reach this input
        alias = x.view_as(x)
        index = module.in_index  # the selection of this forward (the hook may fire after it changed)
        alias.register_hook(lambda grad: unit._record_gradient(self.name, module, x, grad, index))
        return (alias,) + tuple(args[1:])


class _OutputHook(_Hook):
    """Forward hook on a producing layer: the positions of its output per sample (``'act'`` normalisation)."""

    def __call__(self, module, args, output):
        unit = self.owner(module)
        if unit is None or not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        unit._record_positions(module, output)


@register_unit
class GroupFisherChannelUnit(L1MutableChannelUnit):
    """A unit that learns the normalised Fisher information of each channel while the model trains.

    Args (besides :class:`~pyprune.units.MutableChannelUnit`'s):
        normalization_type: ``'flops'`` (default, as mmrazor), ``'act'`` or ``'none'``; see the module docstring.
            ``'flops'`` needs the FLOPs one channel saves, which :class:`pyprune.algorithms.GroupFisherAlgorithm`
            sets from :class:`pyprune.budget.CostModel` (:meth:`set_channel_flops`).
        mutate_linear: prune units whose channels feed a linear layer (mmrazor's default: False, so the channels
            entering a classifier head keep their width); the unit is fixed otherwise, with that reason.

    Setting a choice ranks by L1 weight magnitude, as mmrazor's GroupFisher unit (an L1 unit) does; the Fisher
    ranking acts through :meth:`try_to_prune_min_channel`, one channel (one per group) at a time. The accumulated
    Fisher is :attr:`normalized_fisher_info` (float64 ``[num_channels]``), saved by :meth:`importance_state_dict`.
    """

    def __init__(self, num_channels: int, normalization_type: str = "flops", mutate_linear: bool = False,
                 choice_mode: str = "number", divisor: int = 1, min_value: int = 1, min_ratio: float = 0.9, **kwargs):
        # mmrazor's order: its own two arguments first, then the L1 unit's
        super().__init__(num_channels, choice_mode, divisor, min_value, min_ratio, **kwargs)
        if normalization_type not in NORMALIZATION_TYPES:
            raise ConfigError(f"unit {self.name}: normalization_type must be one of {list(NORMALIZATION_TYPES)}, "
                              f"got {normalization_type!r}")
        if not isinstance(mutate_linear, bool):
            raise ConfigError(f"unit {self.name}: mutate_linear must be a bool, got {mutate_linear!r}")
        self.normalization_type = normalization_type
        self.mutate_linear = mutate_linear
        self.channel_flops: Optional[float] = None   # FLOPs one channel saves at the current widths
        self.normalized_fisher_info: Optional[Tensor] = None
        self.num_updates = 0
        self.recording = False
        self._handles: List[Any] = []
        self._batch_gradient: Optional[Tensor] = None   # float32 [B, num_channels]: this batch's mask gradients
        self._batch_positions = 0                       # output positions per sample this batch ('act')
        self._consumers: Dict[str, List[Tuple[int, int, int]]] = {}  # layer -> (start, end, expand) of this unit

    @property
    def init_args(self) -> Dict[str, Any]:
        return {**super().init_args, "normalization_type": self.normalization_type,
                "mutate_linear": self.mutate_linear}

    # --------------------------------------------------------------------------------------------------- layers
    def check_layers(self, model: nn.Module) -> Dict[str, nn.Module]:
        """As the base class; also fixes the unit when its channels feed a linear layer and ``mutate_linear`` is
        off (mmrazor's rule), before any layer is converted."""
        modules = super().check_layers(model)
        if not self.mutate_linear and not self.fixed:
            linear = next((ref.name for ref in self.input_related if _kind(modules[ref.name]) is not None
                           and issubclass(_kind(modules[ref.name]), ops.DynamicLinear)), None)
            if linear is not None:
                self.fix(f"its channels feed the linear layer {linear!r} (GroupFisher's mutate_linear=False)")
        return modules

    def consumer_layers(self) -> List[str]:
        """The conv / linear layers reading this unit's channels: where the Fisher information is measured."""
        return list(dict.fromkeys(ref.name for ref in self.input_related
                                  if ref.name in self._modules and is_conv_or_linear(self._modules[ref.name])))

    def producer_layers(self) -> List[str]:
        """The conv / linear layers producing this unit's channels (their outputs' size is ``'act'``'s cost)."""
        return list(dict.fromkeys(ref.name for ref in self.output_related
                                  if ref.name in self._modules and is_conv_or_linear(self._modules[ref.name])))

    # ------------------------------------------------------------------------------------------------ recording
    def start_record_fisher_info(self) -> None:
        """Hook the unit's layers (once; calling again is a no-op) and record from the next forward on."""
        if not self._modules:
            raise ConfigError(f"unit {self.name}: not prepared (no layers bound): prepare the model first")
        self.end_record_fisher_info()
        self._consumers = {}
        consumers = set(self.consumer_layers())
        for ref in self.input_related:
            if ref.name in consumers:
                self._consumers.setdefault(ref.name, []).append((ref.start, ref.end, ref.expand))
        for name in self._consumers:
            self._handles.append(self._modules[name].register_forward_pre_hook(_InputHook(self, name)))
        if self.normalization_type == "act":
            for name in self.producer_layers():
                self._handles.append(self._modules[name].register_forward_hook(_OutputHook(self, name)))
        self.recording = True

    def end_record_fisher_info(self) -> None:
        """Remove the hooks (what was recorded stays until :meth:`reset_recorded`)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.recording = False

    def reset_recorded(self) -> None:
        """Forget the mask gradients recorded since the last :meth:`update_importance`."""
        self._batch_gradient, self._batch_positions = None, 0

    def _record_gradient(self, name: str, module, x: Tensor, grad: Tensor, index: Optional[Tensor]) -> None:
        """Add one consumer call's mask gradient ``[B, num_channels]`` (called from the input view's grad hook)."""
        with torch.no_grad():
            kind = _kind(module)
            is_conv = issubclass(kind, _CONV_KINDS)
            per_active = mask_gradient(x.detach(), grad.detach(), is_conv, len(module.kernel_size) if is_conv else 0)
            width = module_channel_count(module, is_output=False, where=name)
            if index is None:
                full = per_active
            else:
                full = per_active.new_zeros(per_active.shape[0], width)
                full.index_copy_(1, index.to(per_active.device), per_active)
            total = None
            for start, end, expand in self._consumers.get(name, ()):
                part = full[:, start:end].reshape(full.shape[0], self.num_channels, expand).sum(2)
                total = part if total is None else total + part
            if total is None:
                return
            if self._batch_gradient is None:
                self._batch_gradient = total
            elif self._batch_gradient.shape != total.shape:
                raise ConfigError(
                    f"unit {self.name}: layer {name!r} recorded a mask gradient of shape {tuple(total.shape)} but "
                    f"this batch has {tuple(self._batch_gradient.shape)} so far: call update_importance() (the "
                    f"algorithm's after_backward()) after every backward pass")
            else:
                self._batch_gradient += total.to(self._batch_gradient.device)

    def _record_positions(self, module, output: Tensor) -> None:
        """Output positions per sample of one producer call: spatial size (conv) or tokens (linear)."""
        if issubclass(_kind(module), _CONV_KINDS):
            spatial = len(module.kernel_size)
            self._batch_positions += math.prod(output.shape[-spatial:])
        else:
            self._batch_positions += math.prod(output.shape[1:-1]) if output.dim() > 2 else 1

    # ------------------------------------------------------------------------------------------------ importance
    def set_channel_flops(self, flops: float) -> None:
        """The FLOPs one channel of this unit saves at the current widths (``'flops'`` normalisation)."""
        if not isinstance(flops, (int, float)) or isinstance(flops, bool) or not math.isfinite(flops) or flops < 0:
            raise ConfigError(f"unit {self.name}: channel FLOPs must be a finite number >= 0, got {flops!r}")
        self.channel_flops = float(flops)

    def batch_fisher(self) -> Optional[Tensor]:
        """This batch's Fisher information: float64 ``[num_channels]``, ``sum over samples of g ** 2`` (None when
        nothing was recorded). Not normalised, not reduced across ranks; the record is not cleared."""
        if self._batch_gradient is None:
            return None
        return self._batch_gradient.double().square().sum(0)

    def channel_cost(self) -> float:
        """What one channel costs under ``normalization_type``, in mmrazor's units (GFLOPs, millions of values)."""
        if self.normalization_type == "flops":
            if self.channel_flops is None:
                raise ConfigError(f"unit {self.name}: normalization_type='flops' needs the FLOPs of one channel: "
                                  f"GroupFisherAlgorithm sets them from the budget cost model, or call "
                                  f"set_channel_flops(flops)")
            return self.channel_flops / _FLOPS_SCALE
        if self.normalization_type == "act":
            return self._batch_positions / _ACT_SCALE
        return 1.0

    def normalized(self, fisher: Tensor) -> Tensor:
        """``fisher / channel_cost()``; a unit whose channels cost nothing scores ``+inf`` (never pruned first)."""
        cost = self.channel_cost()
        return fisher / cost if cost > 0 else torch.full_like(fisher, math.inf)

    def accumulate_fisher(self, fisher: Tensor) -> None:
        """Add one batch's Fisher information (float ``[num_channels]``, already summed over ranks), normalised."""
        step = self.normalized(fisher.double())
        current = self.normalized_fisher_info
        self.normalized_fisher_info = step if current is None else current + step.to(current.device)
        self.num_updates += 1

    @torch.no_grad()
    def update_importance(self) -> None:
        """After ``loss.backward()``: add this batch's Fisher information (summed over the ranks of the default
        process group when ``torch.distributed`` is initialised) and clear the record."""
        fisher = self.batch_fisher()
        if fisher is not None:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(fisher)
            self.accumulate_fisher(fisher)
        self.reset_recorded()

    update_fisher_info = update_importance  # mmrazor's name

    def reset_importance(self) -> None:
        self.normalized_fisher_info, self.num_updates = None, 0

    reset_fisher_info = reset_importance  # mmrazor's name

    def importance(self) -> Tensor:
        """Normalised Fisher information per channel, float64 ``[num_channels]`` on the layers' device (zeros
        before any update); pruned channels are ``+inf``, so the minimum is always a kept channel."""
        fisher = self.normalized_fisher_info
        fisher = torch.zeros(self.num_channels, dtype=torch.float64, device=self.device) if fisher is None \
            else fisher.to(self.device).clone()
        return fisher.masked_fill_(~self.current_mask, math.inf)

    # ----------------------------------------------------------------------------------------------------- prune
    @property
    def can_prune_channel(self) -> bool:
        """Whether one more channel (one per group) can go: the unit keeps at least ``min_value`` channels and one
        per group."""
        return self.is_mutable and self._count - self.groups >= max(self.min_value, self.groups)

    def prune_score(self) -> Tensor:
        """The score of this unit's next pruning step, a 0-dim float64 tensor: the smallest normalised Fisher of
        each group, averaged over the groups (one channel per group goes together)."""
        return self.importance().reshape(self.groups, -1).amin(1).mean()

    def try_to_prune_min_channel(self) -> bool:
        """Prune the channel with the smallest normalised Fisher (of each group); False when the unit is at its
        minimum width. The selection is set by index (not re-ranked)."""
        if not self.can_prune_channel:
            return False
        blocks = self.importance().reshape(self.groups, -1)
        dropped = blocks.argmin(1) + torch.arange(self.groups, device=blocks.device) * blocks.shape[1]
        mask = self.current_mask
        mask[dropped] = False
        self.apply_index(mask.nonzero().flatten())
        return True

    # ------------------------------------------------------------------------------------------------ checkpoint
    def importance_state_dict(self) -> Dict[str, Any]:
        """``{'fisher': float64 [num_channels] on the CPU or None, 'num_updates': int}``."""
        fisher = self.normalized_fisher_info
        return {"fisher": None if fisher is None else fisher.detach().cpu().clone(), "num_updates": self.num_updates}

    def load_importance_state_dict(self, state: Dict[str, Any]) -> None:
        fisher = state.get("fisher")
        if fisher is not None and tuple(fisher.shape) != (self.num_channels,):
            raise ConfigError(f"unit {self.name}: saved Fisher information has shape {tuple(fisher.shape)}, "
                              f"expected ({self.num_channels},)")
        self.normalized_fisher_info = None if fisher is None else fisher.to(self.device, torch.float64)
        self.num_updates = int(state.get("num_updates", 0))


__all__ = ["GroupFisherChannelUnit", "NORMALIZATION_TYPES", "is_conv_or_linear", "mask_gradient"]
