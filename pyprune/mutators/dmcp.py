"""DMCPChannelMutator: the DMCP units of a model, their architecture parameters, and the subnets DMCP samples from
them (mmrazor's mutator of that name).

Every mutable unit gets one architecture parameter vector ``a`` (float ``[num_groups]``, zeros: every group kept;
:mod:`pyprune.units.dmcp` has the chain they define). The parameters live in :attr:`DMCPChannelMutator.arch_params`
(an ``nn.ParameterDict`` keyed ``'0'``, ``'1'``, ... in the order of :attr:`mutable_units`, as mmrazor keys them),
not in the model: the weight optimizer never sees them, the architecture optimizer sees only them.

Subnets (:meth:`DMCPChannelMutator.sample_subnet`): ``'max'`` (every channel), ``'min'`` (the always-kept prefix),
``'random'`` (uniform over each unit's grid), ``'direct'`` (a width drawn from each unit's chain) and ``'expected'``
(each unit's expected width, rounded down). With ``arch_train`` on, the forward multiplies each unit's output
channels by their marginal probabilities (:meth:`DMCPChannelUnit.channel_scale`), so the task loss is
differentiable w.r.t. the architecture parameters: on the unit's norm layers among its producers (mmrazor scales
the output of its BatchNorm layers), or on its conv / linear producers when none of them is a norm.
"""
import weakref
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import ConfigError
from ..registry import MODELS
from ..units.dmcp import DEFAULT_PRUNING_CFG, DMCPChannelUnit, check_pruning_cfg
from ..units.modules import module_channel_count
from .channel_mutator import ChannelMutator

SUBNET_MODES = ("max", "min", "random", "direct", "expected")
_NORM_KINDS = (ops.DynamicBatchNorm1d, ops.DynamicBatchNorm2d, ops.DynamicBatchNorm3d, ops.DynamicGroupNorm,
               ops.DynamicLayerNorm, ops.DynamicChannelNorm)
_PRODUCER_KINDS = (ops.DynamicConv1d, ops.DynamicConv2d, ops.DynamicConv3d, ops.DynamicLinear)


def _is_kind(module, kinds) -> bool:
    kind = ops.layer_kind(module) if isinstance(module, nn.Module) else None
    return isinstance(kind, type) and issubclass(kind, kinds)


class _ScaleHook:
    """Forward hook on one layer: its output channels times the marginal probabilities of the units producing them.
    Holds the mutator weakly, so a deep copy of the model (an export) carries it inert."""

    def __init__(self, mutator: "DMCPChannelMutator", name: str, parts: List[Tuple[DMCPChannelUnit, object]]):
        self._mutator = weakref.ref(mutator)
        self.name, self.parts = name, parts

    def __getstate__(self):  # a copied or pickled model carries an inert hook, not copies of the units
        return {"name": self.name}

    def __setstate__(self, state) -> None:
        self._mutator, self.name, self.parts = None, state["name"], []

    def __call__(self, module, args, output):
        mutator = None if self._mutator is None else self._mutator()
        if mutator is None or not isinstance(output, Tensor) or mutator._scaled_modules.get(self.name) is not module:
            return None
        full = module_channel_count(module, is_output=True, where=self.name)
        pieces, at = [], 0
        for unit, ref in sorted(self.parts, key=lambda part: part[1].start):
            param = mutator.arch_param(unit)
            param = param.detach() if mutator._detach_arch else param
            if ref.start > at:
                pieces.append(param.new_ones(ref.start - at))
            pieces.append(unit.channel_scale(param).repeat_interleave(ref.expand))
            at = ref.end
        if at < full:
            pieces.append(pieces[-1].new_ones(full - at))
        scale = torch.cat(pieces).to(device=output.device, dtype=output.dtype)
        index = getattr(module, "out_index", None)
        if index is not None:  # the layer runs at a narrower width (gather regime): its active channels' scales
            scale = scale.index_select(0, index.to(scale.device))
        dim = module._channel_dims(output)[0]
        if output.shape[dim] != scale.numel():
            raise ConfigError(f"DMCP: layer {self.name!r} produced {output.shape[dim]} channels (dim {dim}) of an "
                              f"output of shape {tuple(output.shape)}, but its units scale {scale.numel()}")
        shape = [1] * output.dim()
        shape[dim] = scale.numel()
        return output * scale.view(shape)


@MODELS.register_module()
class DMCPChannelMutator(ChannelMutator):
    """A :class:`ChannelMutator` of :class:`~pyprune.units.DMCPChannelUnit` with DMCP's architecture parameters.

    Args: as :class:`ChannelMutator`; ``channel_unit_cfg`` defaults to ``dict(type='DMCPChannelUnit')``, and
        pruning_cfg: ``(min_rate, max_rate, rate_offset)`` of every unit's grid (mmrazor's default
            ``(0.1, 1, 0.05)``: a 10 % prefix and 18 groups of 5 %).
    """

    def __init__(self, channel_unit_cfg=None, parse_cfg: Optional[dict] = None,
                 pruning_cfg: Sequence[float] = DEFAULT_PRUNING_CFG, **kwargs):
        check_pruning_cfg(pruning_cfg, "DMCPChannelMutator")
        super().__init__(dict(type="DMCPChannelUnit") if channel_unit_cfg is None else channel_unit_cfg,
                         parse_cfg, **kwargs)
        if not issubclass(self.unit_class, DMCPChannelUnit):
            raise ConfigError(f"DMCPChannelMutator: channel_unit_cfg type must be DMCPChannelUnit (or a subclass), "
                              f"got {self.unit_class.__name__}")
        self.pruning_cfg = tuple(float(v) for v in pruning_cfg)
        self.arch_params = nn.ParameterDict()
        self._arch_key: Dict[str, str] = {}
        self._hooks: List = []
        self._scaled_modules: Dict[str, nn.Module] = {}
        self._detach_arch = False
        self.arch_train = False

    # --------------------------------------------------------------------------------------------------- preparing
    def prepare_from_supernet(self, model: nn.Module) -> None:
        """Parse and prepare the model as :class:`ChannelMutator` does, then give every mutable unit its grid and
        its architecture parameters."""
        super().prepare_from_supernet(model)
        self.prepare_arch_params(model)

    def prepare_arch_params(self, model: nn.Module) -> None:
        """One zero vector ``[num_groups]`` per mutable unit, on the unit's device (mmrazor's ``_build_arch_param``),
        and the layers each unit's scale acts on."""
        for unit in self.mutable_units:  # every grid first: a refused pruning_cfg leaves no parameters behind
            unit.set_pruning_cfg(self.pruning_cfg)
        self.arch_params = nn.ParameterDict()
        self._arch_key = {}
        for position, unit in enumerate(self.mutable_units):
            key = str(position)
            self.arch_params[key] = nn.Parameter(torch.zeros(unit.num_groups, device=unit.device))
            self._arch_key[unit.name] = key
        self._scale_parts = self._scaled_layers()

    def _scaled_layers(self) -> Dict[str, List[Tuple[DMCPChannelUnit, object]]]:
        """layer name -> [(unit, output ref)] for the layers whose outputs the architecture step scales."""
        parts: Dict[str, List[Tuple[DMCPChannelUnit, object]]] = {}
        for unit in self.mutable_units:
            if unit.num_groups == 0:
                continue
            layers = unit.output_layers()
            chosen = [(ref, m) for ref, m in layers if _is_kind(m, _NORM_KINDS)] or \
                [(ref, m) for ref, m in layers if _is_kind(m, _PRODUCER_KINDS)]
            for ref, module in chosen:
                parts.setdefault(ref.name, []).append((unit, ref))
        return parts

    # ----------------------------------------------------------------------------------------------- parameters
    def arch_param(self, unit: DMCPChannelUnit) -> nn.Parameter:
        """The architecture parameters of ``unit`` (float ``[num_groups]``)."""
        return self.arch_params[self._arch_key[unit.name]]

    def arch_parameters(self) -> List[nn.Parameter]:
        """Every unit's architecture parameters: what the architecture optimizer steps."""
        return list(self.arch_params.values())

    def arch_state_dict(self) -> Dict[str, Tensor]:
        """``{unit name: float [num_groups] CPU copy of its architecture parameters}``."""
        return {unit.name: self.arch_param(unit).detach().cpu().clone() for unit in self.mutable_units}

    def check_arch_state(self, state) -> None:
        """Validate saved architecture parameters: every mutable unit named, each a tensor of its shape (else
        ConfigError naming the unit)."""
        if not isinstance(state, Mapping):
            raise ConfigError(f"DMCPChannelMutator: saved architecture parameters must be a dict, got "
                              f"{type(state).__name__}")
        names = {unit.name for unit in self.mutable_units}
        unknown, missing = sorted(set(state) - names), sorted(names - set(state))
        if unknown or missing:
            wrong = [f"{what} units {names}" for what, names in (("unknown", unknown), ("missing", missing)) if names]
            raise ConfigError(f"DMCPChannelMutator: saved architecture parameters: {', '.join(wrong)}")
        for unit in self.mutable_units:
            saved = state[unit.name]
            if not isinstance(saved, Tensor) or tuple(saved.shape) != (unit.num_groups,):
                described = f"{tuple(saved.shape)} {saved.dtype}" if isinstance(saved, Tensor) else type(saved).__name__
                raise ConfigError(f"unit {unit.name}: saved architecture parameters are {described}, expected "
                                  f"shape ({unit.num_groups},)")

    def load_arch_state_dict(self, state: Mapping) -> None:
        """Copy saved architecture parameters in place (the optimizer keeps stepping the same tensors), after
        :meth:`check_arch_state` (a refusal changes nothing)."""
        self.check_arch_state(state)
        with torch.no_grad():
            for unit in self.mutable_units:
                param = self.arch_param(unit)
                param.copy_(state[unit.name].to(param.device, param.dtype))

    # -------------------------------------------------------------------------------------------------- sampling
    def subnet_counts(self, mode: str, generator: Optional[torch.Generator] = None) -> Dict[str, int]:
        """``{unit name: channel count}`` of a subnet of ``mode`` (one of :data:`SUBNET_MODES`); not applied."""
        if mode not in SUBNET_MODES:
            raise ConfigError(f"DMCPChannelMutator: subnet mode must be one of {list(SUBNET_MODES)}, got {mode!r}")
        self._require_prepared()
        counts = {}
        for unit in self.mutable_units:
            if mode == "max":
                counts[unit.name] = unit.num_channels
            elif mode == "min":
                counts[unit.name] = unit.grid_count(0)
            elif mode == "random":
                counts[unit.name] = unit.sample_grid(generator)
            elif mode == "direct":
                counts[unit.name] = unit.sample_chain(self.arch_param(unit), generator)
            else:
                counts[unit.name] = unit.expected_count(self.arch_param(unit))
        return counts

    def sample_subnet(self, mode: str, arch_train: bool, generator: Optional[torch.Generator] = None,
                      detach: bool = False) -> Dict[str, int]:
        """Set the subnet of ``mode`` and switch the architecture scaling of the forward on (``arch_train``) or
        off (mmrazor's ``sample_subnet``); ``detach``: scale with the parameters' values only (no gradient reaches
        them). Returns the counts set."""
        counts = self.subnet_counts(mode, generator)
        self.apply_counts(counts)
        self.modify_supernet_forward(arch_train, detach)
        return counts

    def apply_counts(self, counts: Dict[str, int]) -> None:
        """Set channel counts on the named units (one assembler pass; counts are the units' own grid widths)."""
        with self._assembler.deferred():
            for name, count in counts.items():
                unit = self._by_name[name]
                # number mode validates the count as any choice; ratio mode would refuse an int, so it rounds
                unit.apply_count(unit.choice_to_count(count) if unit.choice_mode == "number" else unit._round(count))

    def modify_supernet_forward(self, arch_train: bool, detach: bool = False) -> None:
        """Scale the units' outputs by their marginal probabilities from now on (``arch_train``), or stop."""
        self.arch_train, self._detach_arch = bool(arch_train), bool(detach)
        if arch_train and not self._hooks:
            self._scaled_modules = {}
            for name, parts in self._scale_parts.items():
                module = parts[0][0].module(name)
                self._scaled_modules[name] = module
                self._hooks.append(module.register_forward_hook(_ScaleHook(self, name, parts)))
        elif not arch_train:
            for handle in self._hooks:
                handle.remove()
            self._hooks, self._scaled_modules = [], {}

    # ------------------------------------------------------------------------------------------------ expectation
    def expected_counts(self) -> List:
        """Aligned with :attr:`units`: each mutable unit's expected width (a 0-dim tensor differentiable w.r.t.
        its architecture parameters), the other units' current count (an int)."""
        mutable = {unit.name for unit in self.mutable_units}
        return [unit.expected_channels(self.arch_param(unit)) if unit.name in mutable else unit.active_channels
                for unit in self.units]


__all__ = ["DMCPChannelMutator", "SUBNET_MODES"]
