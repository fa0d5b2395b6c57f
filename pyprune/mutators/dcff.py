"""DCFFChannelMutator: the DCFF units of a model, their temperature and fused filters (mmrazor's mutator of that
name)."""
import copy
from typing import Any, Dict, Optional

from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..units.dcff import DCFFChannelUnit, fuse_conversion
from .channel_mutator import ChannelMutator

DEFAULT_PARSE_CFG = {"type": "ChannelAnalyzer", "demo_input": (1, 3, 224, 224), "tracer_type": "BackwardTracer"}


@MODELS.register_module()
class DCFFChannelMutator(ChannelMutator):
    """A :class:`ChannelMutator` of :class:`~pyprune.units.DCFFChannelUnit` (or a subclass) whose convs become
    :class:`~pyprune.ops.FuseConv2d` (any rank), with the step mmrazor's mutator adds: :meth:`calc_information`
    (rank at a temperature and fuse the kept filters), :meth:`set_tau` and
    :meth:`fuse_filters` (its two halves), and the fusion's checkpoint (:meth:`fusion_state`).

    Args: as :class:`ChannelMutator`, with mmrazor's defaults: ``channel_unit_cfg=dict(type='DCFFChannelUnit',
    units={})``, ``parse_cfg=dict(type='ChannelAnalyzer', demo_input=(1, 3, 224, 224),
    tracer_type='BackwardTracer')``.
    """

    def __init__(self, channel_unit_cfg=None, parse_cfg: Optional[dict] = None, **kwargs):
        super().__init__(dict(type="DCFFChannelUnit", units={}) if channel_unit_cfg is None else channel_unit_cfg,
                         copy.deepcopy(DEFAULT_PARSE_CFG) if parse_cfg is None else parse_cfg, **kwargs)
        if not issubclass(self.unit_class, DCFFChannelUnit):
            raise ConfigError(f"DCFFChannelMutator: channel_unit_cfg type must be DCFFChannelUnit (or a subclass), "
                              f"got {self.unit_class.__name__}")

    def _plan_conversion(self, model: nn.Module, mutable) -> Dict[str, object]:
        return fuse_conversion(model, super()._plan_conversion(model, mutable))

    # ------------------------------------------------------------------------------------------------- fusion
    def set_tau(self, tau: float) -> None:
        """The ``tau`` (divisor of the filter distances) every mutable unit ranks and fuses at from now on."""
        self._require_prepared()
        for unit in self.mutable_units:
            unit.set_tau(tau)

    def fuse_filters(self) -> None:
        """Every mutable unit fuses its kept filters at its ``tau`` (a unit at full width fuses nothing)."""
        self._require_prepared()
        for unit in self.mutable_units:
            unit.fuse_filters()

    def calc_information(self, tau: float) -> None:
        """mmrazor's step: at temperature ``tau``, every unit re-ranks its channels at its current width and fuses
        the kept filters."""
        self.set_tau(tau)
        with self._assembler.deferred():
            for unit in self.mutable_units:
                unit.refresh()
        self.fuse_filters()

    def clear_fusion(self) -> None:
        """Every conv computes with its kept filters as they are again."""
        for unit in self.units:
            unit.clear_fusion()

    def fusion_state(self) -> Dict[str, Dict[str, Tensor]]:
        """``{unit name: {conv name: fusion block}}`` of the units that fuse now (see
        :meth:`DCFFChannelUnit.fusion_state`)."""
        self._require_prepared()
        return {unit.name: state for unit in self.mutable_units for state in [unit.fusion_state()] if state}

    def load_fusion_state(self, state: Dict[str, Dict[str, Tensor]], where: str = "load_fusion_state") -> None:
        """Inverse of :meth:`fusion_state`. Every entry is checked before any is set (unknown unit or layer names,
        wrong shapes: ConfigError naming them, nothing changed); units not named stop fusing."""
        self._require_prepared()
        units = {unit.name: unit for unit in self.mutable_units}
        unknown = sorted(set(state) - set(units))
        if unknown:
            raise ConfigError(f"{where}: unknown DCFF units {unknown}")
        for name, unit_state in state.items():
            units[name].check_fusion_state(unit_state, where)
        for unit in units.values():
            unit.load_fusion_state(state.get(unit.name, {}), where)

    # ------------------------------------------------------------------------------------------------- config
    def config_template(self, only_mutable_units: bool = False, with_unit_init_args: bool = False,
                        with_channels: bool = False) -> Dict[str, Any]:
        """As :meth:`ChannelMutator.config_template`, typed ``DCFFChannelMutator`` (as mmrazor's fix_subnet files
        are)."""
        config = super().config_template(only_mutable_units, with_unit_init_args, with_channels)
        config["type"] = type(self).__name__
        return config


__all__ = ["DCFFChannelMutator"]
