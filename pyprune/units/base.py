"""MutableChannelUnit: one coupled group of channels that is pruned as a whole (mmrazor semantics)."""
import copy
import inspect
import math
import numbers
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..channels import UnitSpec, ratio_to_count, ref_to_dict
from ..errors import ChannelSelectionError, ConfigError
from .assembler import LayerIndexAssembler
from .channel_unit import ChannelUnit
from .modules import (get_layer, module_channel_count, module_device, plan_dynamic_conversion, replace_modules,
                      selection_groups)
from .rounding import kept_channel_count

CHOICE_MODES = ("ratio", "number")


class MutableChannelUnit(ChannelUnit):
    """A set of channels shared by several layers, pruned together.

    ``output_related`` refs name layers whose *output* channels (``[start, end)``, each unit channel spanning
    ``expand`` layer channels) are these channels; ``input_related`` refs name layers that consume them. A selection
    is a sorted int64 index ``[K]`` into ``[0, num_channels)``; it keeps the same count in each of ``groups`` equal
    blocks. Subclasses say which channels (``_select``): a prefix, or the most important ones.

    Init args (the ones configs carry), with mmrazor's defaults: ``num_channels``, ``choice_mode`` (``'number'``:
    :attr:`current_choice` reads as a channel count and an int choice is a count in [1, num_channels];
    ``'ratio'``: it reads as the kept fraction and int choices are refused; in both modes a float choice is a ratio
    in (0, 1], turned into ``ratio_to_count(ratio, num_channels)`` channels: mmrazor's ``max(1, int(ratio *
    num_channels))``, see :func:`pyprune.channels.ratio_to_count`), ``divisor`` (kept
    counts are rounded to a multiple of it), ``min_value`` (never keep fewer), ``min_ratio`` (never round below
    this fraction of the asked count).

    mmrazor's constructors (``init_from_cfg`` with a ``choice``, ``init_from_channel_analyzer``,
    ``init_from_channel_unit``, ``init_from_mutable_channel``) come from :class:`ChannelUnit`; :meth:`fix_chosen`
    freezes the width.
    """

    def __init__(self, num_channels: int, choice_mode: str = "number", divisor: int = 1, min_value: int = 1,
                 min_ratio: float = 0.9, *, output_related: Sequence = (), input_related: Sequence = (),
                 groups: int = 1, fixed: bool = False, reason: str = "", name: Optional[str] = None):
        super().__init__(num_channels)
        self.output_related = list(output_related)
        self.input_related = list(input_related)
        self._name = name
        self._check_init_args(num_channels, choice_mode, divisor, min_value, min_ratio, groups)
        self.num_channels = int(num_channels)
        self.choice_mode = choice_mode
        self.divisor = int(divisor)
        self.min_value = int(min_value)
        self.min_ratio = float(min_ratio)
        self.groups = int(groups)
        self.fixed = bool(fixed)
        self.reason = reason
        # The selection's one owner: every other copy (the layers' indices, a ChannelParameter's index, the
        # assembler's last applied index, a predefined mutable's mask) is derived from these two and pushed out by
        # _store; the saved form is built from them too (pyprune.units.saved_selection).
        self._count = self.num_channels     # Python int: how many channels are kept (no device sync needed)
        self._index: Optional[Tensor] = None  # None = all channels
        self._custom_index = False          # True after apply_index: not what _select would pick
        self.version = 0                    # bumped whenever the selection changes
        self._modules: Dict[str, nn.Module] = {}
        self._assembler = None
        self._chosen_fixed = False          # fix_chosen: the width may not change any more
        self.mutable_channel = None         # a predefined model's mutable, kept in step with the selection

    @classmethod
    def from_spec(cls, spec: UnitSpec, **init_args) -> "MutableChannelUnit":
        """Build from a tracer ``UnitSpec`` plus init args (``num_channels`` in them must match the spec)."""
        num_channels = init_args.pop("num_channels", spec.num_channels)
        name = init_args.pop("name", None) or spec.name
        if num_channels != spec.num_channels:
            raise ConfigError(f"unit {name}: init_args num_channels={num_channels} but the model has "
                              f"{spec.num_channels} channels there")
        try:
            return cls(spec.num_channels, output_related=spec.output_related, input_related=spec.input_related,
                       groups=spec.groups, fixed=spec.fixed, reason=spec.reason, name=name, **init_args)
        except TypeError as error:  # an init arg this unit type does not take
            raise ConfigError(f"unit {name}: bad init args for {cls.__name__}: {error}") from None

    @classmethod
    def init_from_cfg(cls, model: Optional[nn.Module], config) -> "MutableChannelUnit":
        """As :meth:`ChannelUnit.init_from_cfg`, then the config's ``choice`` (if any) is set."""
        unit = super().init_from_cfg(model, config)
        if "choice" in config:
            unit.current_choice = config["choice"]
        return unit

    @classmethod
    def init_from_mutable_channel(cls, mutable, **init_args) -> "MutableChannelUnit":
        """A unit of ``mutable.num_channels`` channels that takes over the mutable's choice mode, candidates (where
        this unit type has them) and current width, and keeps the mutable's mask in step (see
        :mod:`pyprune.units.mutable_channel`). Channels are added by the caller."""
        unit = cls(**{**init_args_from_mutable(cls, mutable), **init_args})
        unit.adopt_mutable(mutable)
        return unit

    def adopt_mutable(self, mutable) -> None:
        """Start at ``mutable``'s width and keep its mask equal to this unit's selection from now on."""
        count = int(mutable.current_mask.sum())  # once, while building: a host read is fine
        self.mutable_channel = mutable
        if count != self._count and not self.fixed:
            self.apply_count(self.width_to_count(count) if self.choice_mode == "number" else
                             self.width_to_count(count / self.num_channels))
        else:
            self.mutable_channel.mask = self.current_mask

    def _adopt(self, outputs, inputs, groups: int, fixed_reason: str) -> None:
        if not _is_int(groups) or groups < 1 or self.num_channels % groups:
            raise ConfigError(f"unit {self.name}: groups must be a positive divisor of num_channels="
                              f"{self.num_channels}, got {groups!r}")
        self.output_related, self.input_related, self.groups = list(outputs), list(inputs), groups
        if fixed_reason:
            self.fix(fixed_reason)

    # ------------------------------------------------------------------------------------------------ validation
    def _check_init_args(self, num_channels, choice_mode, divisor, min_value, min_ratio, groups) -> None:
        def bad(what):
            raise ConfigError(f"unit {self.name}: {what}")
        if not _is_int(num_channels) or num_channels < 1:
            bad(f"num_channels must be a positive int, got {num_channels!r}")
        if choice_mode not in CHOICE_MODES:
            bad(f"choice_mode must be one of {CHOICE_MODES}, got {choice_mode!r}")
        if not _is_int(divisor) or divisor < 1:
            bad(f"divisor must be an int >= 1, got {divisor!r}")
        if not _is_int(min_value) or min_value < 1:
            bad(f"min_value must be an int >= 1, got {min_value!r}")
        if not _is_real(min_ratio) or not 0.0 <= min_ratio <= 1.0:
            bad(f"min_ratio must be a number in [0, 1], got {min_ratio!r}")
        if not _is_int(groups) or groups < 1 or num_channels % groups:
            bad(f"groups must be a positive divisor of num_channels={num_channels}, got {groups!r}")

    def _fail(self, what: str):
        raise ChannelSelectionError(f"unit {self.name}: {what}")

    def choice_to_count(self, choice) -> int:
        """Validate ``choice`` for this unit and return the channel count it keeps; nothing is changed."""
        count = self.width_to_count(choice)
        if self.fixed and count != self.num_channels:
            self._fail(f"the unit is fixed ({self.reason or 'not prunable'}); only the full width is allowed")
        if self._chosen_fixed and count != self._count:
            self._fail(f"the width was fixed at {self._count} channels by fix_chosen")
        return count

    def width_to_count(self, choice) -> int:
        """As :meth:`choice_to_count`, ignoring whether the unit is fixed."""
        if _is_int(choice):
            if self.choice_mode == "ratio":  # 1 would read as "all channels", 32 as an error: say what to do
                self._fail(f"choice {choice!r} is an int, but the unit is in ratio mode: give a float ratio in "
                           f"(0, 1] (e.g. {min(choice, self.num_channels) / self.num_channels:.3g}), or build the "
                           f"units with choice_mode='number' to set channel counts")
            if not 1 <= choice <= self.num_channels:
                self._fail(f"channel count must be in [1, {self.num_channels}], got {choice!r}")
            return self._round(int(choice))
        if not _is_real(choice):
            expected = "a ratio (float) in (0, 1]" if self.choice_mode == "ratio" else \
                f"an int channel count in [1, {self.num_channels}] or a float ratio in (0, 1]"
            self._fail(f"choice must be {expected}, got {type(choice).__name__} {choice!r}")
        if not math.isfinite(choice) or not 0.0 < choice <= 1.0:
            self._fail(f"a float choice is a ratio and must be in (0, 1], got {choice!r}")
        return self._round(ratio_to_count(float(choice), self.num_channels))

    def _round(self, asked: float) -> int:
        return kept_channel_count(asked, self.num_channels, self.divisor, self.min_value, self.min_ratio,
                                  self.groups)

    def count_to_choice(self, count: int):
        return count / self.num_channels if self.choice_mode == "ratio" else int(count)

    def choice_from_ratio(self, ratio: float):
        """A choice in this unit's mode for a kept ``ratio`` in (0, 1]: the count :func:`ratio_to_count` names (an
        int in number mode, ``count / num_channels`` in ratio mode), so it keeps what ``current_choice = ratio``
        keeps. What :meth:`ChannelMutator.set_global_ratio` and a one-float ``target_pruning_ratio`` ask for."""
        if not _is_real(ratio) or not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
            self._fail(f"a kept ratio must be a number in (0, 1], got {ratio!r}")
        return self.count_to_choice(ratio_to_count(float(ratio), self.num_channels))

    # --------------------------------------------------------------------------------------------------- choices
    def fix_chosen(self, choice=None) -> None:
        """Set ``choice`` (if given), then keep this width: later choices of another width are refused (mmrazor's
        ``fix_chosen``, which a mutator's ``fix_channel_mutables`` calls on every unit)."""
        if choice is not None:
            self.current_choice = choice
        self._chosen_fixed = True

    @property
    def is_chosen_fixed(self) -> bool:
        return self._chosen_fixed

    def fix(self, reason: str) -> None:
        """Stop pruning this unit: back to the full width, and only that from now on."""
        self.fixed, self.reason = True, reason
        if self._count != self.num_channels:
            self.apply_count(self.num_channels)

    @property
    def is_mutable(self) -> bool:
        """Prunable: not fixed and both produced and consumed by known layers."""
        return not self.fixed and bool(self.output_related) and bool(self.input_related)

    @property
    def current_choice(self):
        """The kept width: ``count / num_channels`` in ratio mode, the count in number mode."""
        return self.count_to_choice(self._count)

    @current_choice.setter
    def current_choice(self, choice) -> None:
        self.apply_count(self.choice_to_count(choice))

    @property
    def active_channels(self) -> int:
        return self._count

    def apply_count(self, count: int) -> None:
        """Trusted: keep ``count`` channels (a value from :meth:`choice_to_count`); select them, tell the layers."""
        self._store(count, None if count == self.num_channels else self._select(count), custom=False)

    def apply_index(self, index: Tensor) -> None:
        """Trusted: keep exactly ``index`` (sorted, unique int64 ``[K]`` with ``K / groups`` channels per group),
        e.g. to restore a saved or broadcast selection. Only the length is checked (values would need a sync).
        """
        count = int(index.numel())
        if index.dim() != 1 or not 1 <= count <= self.num_channels or count % self.groups:
            self._fail(f"apply_index needs a 1-D index of 1..{self.num_channels} channels, a multiple of "
                       f"groups={self.groups}; got shape {tuple(index.shape)}")
        self._store(count, None if count == self.num_channels else index.to(torch.int64), custom=True)

    def _store(self, count: int, index: Optional[Tensor], custom: bool) -> None:
        self._count, self._index, self._custom_index = count, index, custom
        self.version += 1
        if self.mutable_channel is not None:  # a predefined model's own mutable follows the unit (a derived mask)
            self.mutable_channel.mask = self.current_mask
        if self._assembler is not None:
            self._assembler.unit_changed(self)

    def _select(self, count: int) -> Tensor:
        """Sorted int64 index ``[count]`` of the kept channels (``count / groups`` in each group)."""
        raise NotImplementedError(f"{type(self).__name__} does not say which channels to keep")

    def sample_choice(self):
        """A random valid choice (uniform over counts, then rounded like any choice)."""
        asked = int(torch.randint(1, self.num_channels + 1, ()))
        return self.count_to_choice(self._round(asked))

    @property
    def max_choice(self):
        return self.count_to_choice(self.num_channels)

    @property
    def min_choice(self):
        return self.count_to_choice(self._round(self.min_value))

    # ------------------------------------------------------------------------------------------------- selection
    @property
    def device(self) -> torch.device:
        """Device of the unit's layers (cpu before ``prepare_for_pruning``)."""
        for module in self._modules.values():
            return module_device(module)
        return torch.device("cpu")

    @property
    def current_index(self) -> Tensor:
        """Sorted int64 ``[K]`` of kept channels, on the layers' device."""
        device = self.device
        if self._index is None:
            return torch.arange(self.num_channels, device=device)
        if self._index.device != device:  # the model was moved after the choice was made
            self._index = self._index.to(device)
        return self._index

    @property
    def selected_index(self) -> Optional[Tensor]:
        """The kept index as the unit holds it, without moving it: ``None`` (all channels), or sorted int64 ``[K]``
        on the host (built from a count, e.g. a prefix) or on the layers' device (ranked from the weights)."""
        return self._index

    @property
    def selection_key(self):
        """Hashable; equal keys mean the same selection, so what was built for one may be reused. The version by
        default; units whose selection follows from the count alone answer the count."""
        return ("version", self.version)

    @property
    def current_mask(self) -> Tensor:
        """Bool ``[num_channels]``, True where a channel is kept."""
        device = self.device
        if self._index is None:
            return torch.ones(self.num_channels, dtype=torch.bool, device=device)
        mask = torch.zeros(self.num_channels, dtype=torch.bool, device=device)
        return mask.index_fill_(0, self.current_index, True)

    # ------------------------------------------------------------------------------------------------- the model
    @property
    def related_refs(self) -> List:
        return self.output_related + self.input_related

    def module_names(self) -> List[str]:
        return list(dict.fromkeys(ref.name for ref in self.related_refs))

    def prepare_for_pruning(self, model: nn.Module) -> None:
        """Turn the unit's layers into DynamicOps in place (each module once) and apply the current choice.

        Validates everything first: a missing or unconvertible module raises ConfigError, the model unchanged.
        """
        plan = plan_dynamic_conversion(model, self.related_refs, f"unit {self.name}")
        ops.serve_read_layers(model, self.related_refs)  # checks every ref before it serves one
        replace_modules(model, plan)
        self.bind(model)
        if self._assembler is None:
            LayerIndexAssembler([self]).attach(model)
        self.apply_count(self._count)  # importance units re-rank now that they can see the weights

    def bind(self, model: nn.Module) -> None:
        """Resolve the unit's module names to the model's (dynamic) modules, after :meth:`check_layers`."""
        self._modules = self.check_layers(model)

    def check_layers(self, model: nn.Module) -> Dict[str, nn.Module]:
        """The unit's modules in ``model``; checks that each range is ``num_channels * expand`` wide and adopts
        the group constraint of grouped convs it covers (their compact rows must stay balanced per group).

        Raises ConfigError naming the unit; works on plain layers, so it can run before any conversion.
        """
        modules = {}
        for ref in self.related_refs:
            if ref.name not in modules:
                modules[ref.name] = get_layer(model, ref, f"unit {self.name}")
        groups = self.groups
        for ref in self.related_refs:
            expand, width = ref.expand, ref.width
            if width != self.num_channels * expand:
                raise ConfigError(f"unit {self.name}: range [{ref.start}, {ref.end}) of {ref.name!r} is {width} "
                                  f"channels, expected num_channels * expand = {self.num_channels} * {expand}")
            layer_groups = selection_groups(modules[ref.name])
            if layer_groups == 1:
                continue
            side = module_channel_count(modules[ref.name], ref.is_output_channel, ref.name)
            groups = groups * layer_groups // math.gcd(groups, layer_groups)
            if (ref.start, ref.end) != (0, side) or expand != 1 or self.num_channels % groups:
                raise ConfigError(f"unit {self.name}: covers channels [{ref.start}, {ref.end}) of grouped layer "
                                  f"{ref.name!r} (groups / heads={layer_groups}) in a way that cannot stay "
                                  f"balanced per group")
        self.groups = groups
        return modules

    def module(self, name: str) -> nn.Module:
        return self._modules[name]

    def output_layers(self):
        """(ref, module) for every bound output-related layer."""
        return [(ref, self._modules[ref.name]) for ref in self.output_related if ref.name in self._modules]

    # ---------------------------------------------------------------------------------------------------- config
    @property
    def init_args(self) -> Dict[str, Any]:
        return {"num_channels": self.num_channels, "choice_mode": self.choice_mode, "divisor": self.divisor,
                "min_value": self.min_value, "min_ratio": self.min_ratio}

    def config_template(self, with_init_args: bool = False, with_channels: bool = False) -> Dict[str, Any]:
        """``{'init_args': ..., 'choice': ..., 'channels': {'input_related': [...], 'output_related': [...]}}``."""
        config: Dict[str, Any] = {}
        if with_init_args:
            config["init_args"] = dict(self.init_args)
        config["choice"] = self.current_choice
        if with_channels:
            config["channels"] = {"input_related": [ref_to_dict(r) for r in self.input_related],
                                  "output_related": [ref_to_dict(r) for r in self.output_related]}
            # Not in mmrazor's layout; needed to rebuild the unit from its channels alone (parse_cfg type 'Config').
            if self.groups != 1:
                config["channels"]["groups"] = self.groups
            if self.fixed:
                config["channels"]["fixed"] = self.reason or "fixed"
        return config

    def __repr__(self) -> str:
        state = "fixed" if self.fixed else f"{self._count}/{self.num_channels}"
        return f"{type(self).__name__}({self.name}, {state})"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def init_args_from_mutable(cls, mutable) -> Dict[str, Any]:
    """The init args of ``cls`` that a mutable channel knows: ``num_channels``, and ``choice_mode`` /
    ``candidate_choices`` where both the mutable and the unit type have them."""
    params = inspect.signature(cls.__init__).parameters
    args: Dict[str, Any] = {"num_channels": mutable.num_channels}
    for key in ("choice_mode", "candidate_choices"):
        if key in params and hasattr(mutable, key):
            args[key] = copy.copy(getattr(mutable, key))
    return args
