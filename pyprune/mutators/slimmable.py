"""SlimmableChannelMutator: the slimmable units of a model and the subnets they form (mmrazor's mutator of that
name), plus the max / min / random choices the sandwich rule draws."""
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import torch

from ..errors import ConfigError
from ..registry import MODELS
from ..units.slimmable import SlimmableChannelUnit
from .channel_mutator import ChannelMutator

DEFAULT_UNIT_CFG = {"type": "SlimmableChannelUnit", "units": {}}
DEFAULT_PARSE_CFG = {"type": "ChannelAnalyzer", "demo_input": (1, 3, 224, 224), "tracer_type": "BackwardTracer"}


@MODELS.register_module()
class SlimmableChannelMutator(ChannelMutator):
    """A :class:`ChannelMutator` of :class:`~pyprune.units.SlimmableChannelUnit` (or a subclass): every unit keeps
    one of its candidate widths and its BatchNorm2d layers keep a private BN per width.

    ``subnets`` (as mmrazor builds them): subnet ``i`` takes the ``i``-th entry of every configured unit's
    ``init_args.candidate_choices`` (``channel_unit_cfg['units']``), so every configured unit must list the same
    number of candidates (repeats allowed: mmrazor's MobileNetV2 lists ``[8, 8, 32]``). With no units configured,
    ``default_args.candidate_choices`` (one list for every unit, e.g. ratios ``[0.25, 0.5, 1.0]``) gives one uniform
    subnet per entry once the model is prepared.

    Args: as :class:`ChannelMutator`, defaults mmrazor's: ``channel_unit_cfg=dict(type='SlimmableChannelUnit',
    units={})``, ``parse_cfg=dict(type='ChannelAnalyzer', demo_input=(1, 3, 224, 224),
    tracer_type='BackwardTracer')``.

    :meth:`sample_choices` draws a candidate uniformly for every mutable unit, independently, as AutoSlim's random
    subnets are drawn; mmrazor's slimmable mutator refuses to sample.
    """

    def __init__(self, channel_unit_cfg=None, parse_cfg: Optional[dict] = None, init_cfg: Optional[dict] = None,
                 **kwargs):
        super().__init__(dict(DEFAULT_UNIT_CFG) if channel_unit_cfg is None else channel_unit_cfg,
                         dict(DEFAULT_PARSE_CFG) if parse_cfg is None else parse_cfg, init_cfg=init_cfg, **kwargs)
        if not issubclass(self.unit_class, SlimmableChannelUnit):
            raise ConfigError(f"SlimmableChannelMutator: channel_unit_cfg.type must be SlimmableChannelUnit (or a "
                              f"subclass), got {self.unit_class.__name__}")
        self._configured_subnets = _subnets_of(self.units_cfg)
        default = self.unit_default_args.get("candidate_choices")
        if default is not None and (isinstance(default, (str, bytes)) or not hasattr(default, "__len__")):
            raise ConfigError(f"channel_unit_cfg.default_args.candidate_choices must be a list, got {default!r}")
        self._default_candidates = None if default is None else list(default)

    # ---------------------------------------------------------------------------------------------------- subnets
    @property
    def num_subnets(self) -> int:
        """How many subnets :attr:`subnets` lists (known from the config, before the model is prepared)."""
        if self._configured_subnets:
            return len(self._configured_subnets)
        return 0 if self._default_candidates is None else len(self._default_candidates)

    @property
    def subnets(self) -> List[Dict[str, Any]]:
        """``[{unit name: choice}]``, one dict per subnet (see the class docstring); ``[]`` when the config names
        no candidates. Copies: changing them changes nothing here."""
        if self._configured_subnets:
            return [dict(subnet) for subnet in self._configured_subnets]
        if self._default_candidates is None or not self.units:
            return []
        return [{u.name: choice for u in self.mutable_units} for choice in self._default_candidates]

    # ---------------------------------------------------------------------------------------------------- choices
    @property
    def max_choices(self) -> Dict[str, Any]:
        """``{unit name: its largest candidate}`` for every mutable unit."""
        return {u.name: u.max_choice for u in self.mutable_units}

    @property
    def min_choices(self) -> Dict[str, Any]:
        """``{unit name: its smallest candidate}`` for every mutable unit."""
        return {u.name: u.min_choice for u in self.mutable_units}

    def set_max_choices(self) -> None:
        self.set_choices(self.max_choices)

    def set_min_choices(self) -> None:
        self.set_choices(self.min_choices)

    def sample_choices(self, generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
        """``{unit name: one of its candidates}`` for every mutable unit, each drawn uniformly and independently from
        ``generator`` (default: torch's default generator); not applied."""
        picks = [int(torch.randint(len(u.candidate_choices), (), generator=generator)) for u in self.mutable_units]
        return {u.name: u.candidate_choices[pick] for u, pick in zip(self.mutable_units, picks)}

    def config_template(self, only_mutable_units: bool = False, with_unit_init_args: bool = False,
                        with_channels: bool = False) -> Dict[str, Any]:
        config = super().config_template(only_mutable_units, with_unit_init_args, with_channels)
        config["type"] = type(self).__name__
        return config


def _subnets_of(units_cfg: Mapping) -> List[Dict[str, Any]]:
    """The subnets of mmrazor's units config (see :class:`SlimmableChannelMutator`); ConfigError naming the first
    unit whose ``candidate_choices`` is missing, not a list, or of another length than the first unit's."""
    lists = {}
    for name, unit_cfg in units_cfg.items():
        candidates = (unit_cfg.get("init_args") or {}).get("candidate_choices")
        if candidates is None:
            raise ConfigError(f"channel_unit_cfg.units[{name!r}].init_args.candidate_choices is missing: every "
                              f"unit of a SlimmableChannelMutator lists its candidate widths")
        if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__len__"):
            raise ConfigError(f"channel_unit_cfg.units[{name!r}].init_args.candidate_choices must be a list, got "
                              f"{candidates!r}")
        lists[name] = list(candidates)
    if not lists:
        return []
    first_name, first = next(iter(lists.items()))
    for name, candidates in lists.items():
        if len(candidates) != len(first):
            raise ConfigError(f"channel_unit_cfg.units[{name!r}].init_args.candidate_choices has {len(candidates)} "
                              f"entries, unit {first_name!r} has {len(first)}: subnet i takes entry i of every "
                              f"unit, so all units list the same number")
    return [{name: candidates[i] for name, candidates in lists.items()} for i in range(len(first))]


__all__ = ["SlimmableChannelMutator"]
