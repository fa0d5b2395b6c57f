"""ChannelUnit: a group of coupled channels without a choice (mmrazor's base of every unit).

It is what the analyzer finds: ``num_channels`` and the layers whose output (``output_related``) and input
(``input_related``) channels they are, as :class:`~pyprune.channels.ChannelRef` ranges. Its constructors are the
ones mmrazor offers, and every :class:`~pyprune.units.MutableChannelUnit` inherits them:

* ``Unit.init_from_cfg(model, config)`` - from ``{'init_args': {...}, 'channels': {...}, 'choice': ...}``;
* ``Unit.init_from_channel_analyzer(model, analyzer=None)`` - one unit per group the analyzer finds;
* ``Unit.init_from_channel_unit(unit, args)`` - the same channels as ``unit``, this class, these init args.
"""
import copy
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

from torch import nn

from ..channels import ChannelRef, UnitSpec, ref_to_dict, unit_name
from ..errors import ConfigError
from .channel_config import channel_refs, repeats_a_shared_layer

__all__ = ["ChannelUnit"]


class ChannelUnit:
    """``num_channels`` channels shared by the layers in ``output_related`` / ``input_related``.

    The name is mmrazor's (first output range, else first input range: ``'conv1_(0, 64)_64'``) unless one is set.
    """

    def __init__(self, num_channels: int, **kwargs):
        self.num_channels = num_channels
        self.output_related: List[ChannelRef] = []
        self.input_related: List[ChannelRef] = []
        self.groups, self.fixed, self.reason = 1, False, ""
        self._name: Optional[str] = None

    # -------------------------------------------------------------------------------------------------- identity
    @property
    def name(self) -> str:
        return self._name or unit_name(self.output_related, self.input_related, self.num_channels)

    @name.setter
    def name(self, name: str) -> None:
        self._name = name

    @property
    def alias(self) -> str:
        return self.name

    def add_output_related(self, channel: ChannelRef) -> None:
        """Add an output range (once)."""
        if not channel.is_output_channel:
            raise ConfigError(f"unit {self.name}: {channel.name} is an input range; use add_input_related")
        if channel not in self.output_related:
            self.output_related.append(channel)

    def add_input_related(self, channel: ChannelRef) -> None:
        """Add an input range (once)."""
        if channel.is_output_channel:
            raise ConfigError(f"unit {self.name}: {channel.name} is an output range; use add_output_related")
        if channel not in self.input_related:
            self.input_related.append(channel)

    def to_spec(self) -> UnitSpec:
        """The unit's channels as the tracer describes a unit."""
        return UnitSpec(self.num_channels, list(self.output_related), list(self.input_related), self.groups,
                        self.fixed, self.reason)

    # ---------------------------------------------------------------------------------------------------- config
    @property
    def init_args(self) -> Dict[str, Any]:
        return {"num_channels": self.num_channels}

    def config_template(self, with_init_args: bool = False, with_channels: bool = False) -> Dict[str, Any]:
        config: Dict[str, Any] = {}
        if with_init_args:
            config["init_args"] = dict(self.init_args)
        if with_channels:
            config["channels"] = {"input_related": [ref_to_dict(r) for r in self.input_related],
                                  "output_related": [ref_to_dict(r) for r in self.output_related]}
        return config

    # -------------------------------------------------------------------------------------------- constructors
    @classmethod
    def init_from_cfg(cls, model: Optional[nn.Module], config: Mapping) -> "ChannelUnit":
        """A unit from a config as :meth:`config_template` (or mmrazor) writes it. ``model`` may be None; given, a
        norm that mmrazor lists on both sides of the unit is kept on the output side only, as pyprune lists it."""
        if not isinstance(config, Mapping) or not isinstance(config.get("init_args"), Mapping):
            raise ConfigError(f"{cls.__name__}.init_from_cfg: the config needs 'init_args' (with num_channels), got "
                              f"{config!r}")
        init_args = dict(copy.deepcopy(config["init_args"]))
        channels = config.get("channels") or {}
        extras = {k: channels[k] for k in ("groups", "fixed") if k in channels}
        unit = cls._from_init_args(init_args, name=None)
        num = unit.num_channels
        where = f"{cls.__name__} ({num} channels)"
        outputs = channel_refs(channels.get("output_related", []), True, num, where)
        inputs = channel_refs(channels.get("input_related", []), False, num, where)
        if model is not None:
            inputs = [ref for ref in inputs if not repeats_a_shared_layer(ref, outputs, model)]
        unit._adopt(outputs, inputs, int(extras.get("groups", 1)), str(extras.get("fixed", "") or ""))
        return unit

    @classmethod
    def init_from_channel_unit(cls, unit: "ChannelUnit", args: Optional[Mapping] = None) -> "ChannelUnit":
        """A ``cls`` over the same channels (and name) as ``unit``, built with ``args`` (num_channels from ``unit``)."""
        new = cls._from_init_args({**dict(args or {}), "num_channels": unit.num_channels}, name=unit._name)
        new._adopt(list(unit.output_related), list(unit.input_related), unit.groups,
                   unit.reason if unit.fixed else "")
        return new

    @classmethod
    def init_from_channel_analyzer(cls, model: nn.Module, analyzer=None) -> List["ChannelUnit"]:
        """One ``cls`` per unit the analyzer (default: ``ChannelAnalyzer()``; a config dict is built) finds."""
        from .analyzer import ChannelAnalyzer
        from ..registry import TASK_UTILS
        if analyzer is None:
            analyzer = ChannelAnalyzer()
        elif isinstance(analyzer, Mapping):
            analyzer = TASK_UTILS.build(analyzer)
        units = []
        for name, config in analyzer.analyze(model).items():
            unit = cls.init_from_cfg(model, config)
            unit.name = name
            units.append(unit)
        return units

    @classmethod
    def _from_init_args(cls, init_args: Dict[str, Any], name: Optional[str]) -> "ChannelUnit":
        try:
            unit = cls(**init_args)
        except TypeError as error:
            raise ConfigError(f"{cls.__name__}: bad init args {init_args}: {error}") from None
        if name is not None:
            unit.name = name
        return unit

    def _adopt(self, outputs: List[ChannelRef], inputs: List[ChannelRef], groups: int, fixed_reason: str) -> None:
        """Take over channels (and the group / fixed facts a config or another unit has about them)."""
        self.output_related, self.input_related = list(outputs), list(inputs)
        self.groups = groups
        if fixed_reason:
            self.fixed, self.reason = True, fixed_reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
