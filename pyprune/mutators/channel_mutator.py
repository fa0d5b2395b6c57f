"""ChannelMutator: owns a model's channel units, their choices and the pruning structure config (mmrazor API)."""
import copy
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..channels import UnitSpec, ref_to_dict
from ..errors import ChannelSelectionError, ConfigError
from ..ops.predefined import DynamicContainer
from ..utils.copying import copy_module
from ..registry import MODELS
from ..tracing import trace_channel_units
from ..tracing.example_inputs import as_call_args
from ..units import LayerIndexAssembler, MutableChannelUnit
from ..units.analyzer import check_trace_fn
from ..units.modules import get_layer, is_dynamic, replace_modules, to_dynamic_layer
from ..units.base import init_args_from_mutable
from ..units.channel_config import config_channels
from ..units.leniency import LenientReport
from ..units.predefined import predefined_units
from ..units.saved_selection import apply_selections, checked_selections, selection_state
from .parse import (TRACER_TYPES, demo_inputs, jsonable_parse_cfg, lenient_config_choice,
                    normalize_parse_cfg, normalize_unit_cfg, specs_from_channels)
from . import selection_hooks
from .narrow_check import fix_units_that_break_narrow
from .hf_export import attach_hf_config
from .summary import PruningSummary, make_summary


@MODELS.register_module()
class ChannelMutator:
    """Finds the coupled channel groups of a model, makes them units, and sets / samples / saves their widths.

    Args:
        channel_unit_cfg: a unit type name (``'L1MutableChannelUnit'``) or ``dict(type=..., default_args=dict(...),
            units={unit name: {'init_args': {...}, 'choice': ...}})``. ``default_args`` go to every unit; a unit's
            own ``init_args`` and ``choice`` are applied after parsing.
        parse_cfg: ``dict(type='ChannelAnalyzer', demo_input=(1, 3, 224, 224), tracer_type='FxTracer' |
            'TorchFunctionTracer' | 'auto')`` traces the model; ``dict(type='Config')`` builds the units from the
            ``channels`` listed in ``channel_unit_cfg['units']`` instead (a saved structure, no tracing);
            ``dict(type='Predefined')`` makes one unit per mutable registered on the model's DynamicOps
            (:mod:`pyprune.units.predefined`). ``fixed_outputs`` (with ``ChannelAnalyzer``) names the model
            outputs that keep their channel count, the others may change it: None (default) fixes every output but
            the auxiliary fields of a transformers ``ModelOutput`` (T5's / Whisper's ``encoder_last_hidden_state``,
            CLIP's tower outputs and embeddings, ``hidden_states``, ...: the table is in
            :mod:`pyprune.tracing.outputs`), ``'all'`` every output, a list the named fields only (e.g.
            ``['logits']``, ``[0]`` for the first item of a tuple output). The export equals the dynamic model on
            the fixed outputs; the freed ones come out narrower, by design.
        fixed: module names (or prefixes, e.g. ``'layer4'``) whose layers keep their exact shape: every unit that
            touches one of them is fixed.
        strict: raise instead of fixing with a warning when a unit's layer cannot be made dynamic (and tell the
            tracer to raise on ops it does not understand), and on config entries mmrazor skips silently (a unit
            the model does not have, a count above a unit's width), which otherwise get one warning.
        trace_fn: the parser ``parse_cfg=dict(type='ChannelAnalyzer')`` calls, with the signature of
            :func:`pyprune.tracing.trace_channel_units` (its default): ``trace_fn(model, example_inputs, *, fixed,
            strict, tracer) -> list[UnitSpec]``, and ``fixed_outputs=`` where the parse_cfg sets it. Give your own to parse models the tracer does not know, or to
            hand-describe units in tests.
        init_cfg: mmrazor's (a BaseModule weight-init config); kept, unused: a mutator has no weights.
    """

    def __init__(self, channel_unit_cfg="SequentialMutableChannelUnit", parse_cfg: Optional[dict] = None,
                 fixed: Sequence[str] = (), strict: bool = False,
                 trace_fn: Callable[..., List[UnitSpec]] = trace_channel_units, init_cfg: Optional[dict] = None):
        unit_cfg = normalize_unit_cfg(channel_unit_cfg)
        self.unit_class = unit_cfg["class"]
        self.unit_default_args: Dict[str, Any] = unit_cfg["default_args"]
        self.units_cfg: Dict[str, Dict[str, Any]] = unit_cfg["units"]
        self.parse_cfg = normalize_parse_cfg(parse_cfg)
        if isinstance(fixed, str) or not all(isinstance(name, str) for name in fixed):
            raise ConfigError(f"fixed must be a list of module names, got {fixed!r}")
        self.fixed: Tuple[str, ...] = tuple(fixed)
        self.strict = bool(strict)
        check_trace_fn(trace_fn, type(self).__name__)
        self.trace_fn = trace_fn
        self.init_cfg = init_cfg
        self.units: List[MutableChannelUnit] = []
        self._by_name: Dict[str, MutableChannelUnit] = {}
        self._assembler: Optional[LayerIndexAssembler] = None

    @classmethod
    def from_config(cls, config: Mapping, trace_fn: Callable[..., List[UnitSpec]] = trace_channel_units
                    ) -> "ChannelMutator":
        """Build from a dict as :meth:`config_template` writes it (``{'type': 'ChannelMutator', ...}``); ``trace_fn``
        as in the constructor (code, so not part of the config)."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"a mutator config must be a dict, got {type(config).__name__}")
        config = dict(config)
        config.pop("_scope_", None)
        kind = MODELS.get(config.pop("type", "ChannelMutator"))  # a name registered for a ChannelMutator class too
        if not (isinstance(kind, type) and issubclass(kind, ChannelMutator)):
            raise ConfigError(f"mutator config type {kind!r} is not a ChannelMutator")
        unknown = set(config) - {"channel_unit_cfg", "parse_cfg", "fixed", "strict", "init_cfg"}
        if unknown:
            raise ConfigError(f"mutator config: unknown keys {sorted(unknown)}")
        return kind(**config, trace_fn=trace_fn)

    # ------------------------------------------------------------------------------------------------- preparing
    def prepare_from_supernet(self, model: nn.Module) -> None:
        """Trace ``model``, build the units, turn their layers into DynamicOps (in place), apply config choices.

        Everything is validated before the model is touched: a bad config (unknown unit names, wrong channel counts,
        bad choices) or a missing ``fixed`` module raises ConfigError / ChannelSelectionError, model unchanged.
        """
        if self.units:
            raise ConfigError("this ChannelMutator is already prepared; create a new one for another model")
        self._check_fixed_names(model)
        self._config_report = LenientReport("channel_unit_cfg.units", self.strict)
        units = self._build_units(self._parse(model))
        self._apply_fixed(units)
        mutable = [u for u in units if u.is_mutable]
        plan = self._plan_conversion(model, mutable)
        mutable = [u for u in units if u.is_mutable]  # some may have been fixed while planning
        counts = self._config_counts(units)
        self._config_report.finish(stacklevel=3)  # one warning for what the config named that was skipped
        assembler = LayerIndexAssembler(mutable)
        assembler.check(model)
        # Validated: from here on the model changes.
        ops.serve_read_layers(model, [ref for unit in mutable for ref in unit.related_refs])  # checks all first
        replace_modules(model, plan)
        for name, module in model.named_modules():
            if isinstance(module, ops.DynamicChannelMixin):
                module.pyprune_name = name
        for unit in mutable:
            unit.bind(model)
            unit.apply_count(counts.get(unit.name, unit.active_channels))
        assembler.attach(model)
        self.units, self._by_name, self._assembler = units, {u.name: u for u in units}, assembler
        # model.state_dict() carries the units' selection, model.load_state_dict gives it back to them (validated
        # before any tensor is copied); the hooks hold the units, not the mutator (pyprune.mutators.selection_hooks)
        selection_hooks.install(model, units, assembler)
        if self.parse_cfg["type"] not in ("Config", "Predefined"):  # a traced structure: check it runs narrower
            with torch.random.fork_rng(devices=[]):  # the demo input's random values leave the user's stream alone
                inputs = as_call_args(demo_inputs(self.parse_cfg, model), model=model)
            fix_units_that_break_narrow(model, units, inputs, _half_count, self.strict)

    def _check_fixed_names(self, model: nn.Module) -> None:
        names = {name for name, _ in model.named_modules()}
        missing = [f for f in self.fixed if f not in names]
        if missing:
            raise ConfigError(f"fixed: the model has no modules named {missing}")

    def _parse(self, model: nn.Module) -> List[Tuple[Optional[str], Any]]:
        """(config name or None, UnitSpec) per unit, from the config's channels or by tracing."""
        self._predefined = {}
        if self.parse_cfg["type"] == "Config":
            named_specs = specs_from_channels(self.units_cfg, model)
            _check_structure_covers(model, [spec for _, spec in named_specs])
            return named_specs
        if self.parse_cfg["type"] == "Predefined":
            found = predefined_units(model)
            self._predefined = {id(spec): mutable for spec, mutable in found}
            return [(None, spec) for spec, _ in found]
        options = {"fixed_outputs": self.parse_cfg["fixed_outputs"]} if "fixed_outputs" in self.parse_cfg else {}
        specs = self.trace_fn(model, demo_inputs(self.parse_cfg, model), fixed=self.fixed,
                              strict=self.strict, tracer=TRACER_TYPES[self.parse_cfg["tracer_type"]], **options)
        return [(None, spec) for spec in specs]

    def _build_units(self, named_specs) -> List[MutableChannelUnit]:
        units, problems, seen = [], [], set()
        for config_name, spec in named_specs:
            name = config_name or spec.name
            if name in seen:  # two units starting at the same range: keep names unique and stable
                name = f"{name}#{sum(1 for n in seen if n.split('#')[0] == name)}"
            seen.add(name)
            unit_cfg = self.units_cfg.get(name, {})
            mutable = self._predefined.get(id(spec))
            from_mutable = {} if mutable is None else init_args_from_mutable(self.unit_class, mutable)
            args = {**self.unit_default_args, **from_mutable, **(unit_cfg.get("init_args") or {}), "name": name}
            try:
                units.append(self.unit_class.from_spec(spec, **args))
                if mutable is not None:  # a predefined model's mutable: its width, kept in step from now on
                    units[-1].adopt_mutable(mutable)
            except ConfigError as error:
                problems.append(str(error))
                continue
            problems += self._channel_mismatch(units[-1], unit_cfg)
        unknown = sorted(set(self.units_cfg) - seen)
        if problems:
            if unknown:
                problems.append(f"units in the config but not in the model: {unknown}")
            raise ConfigError("the config does not match the model:\n  " + "\n  ".join(problems))
        self._config_report.ignore(unknown, "units the model does not have")  # mmrazor skips them
        return units

    @staticmethod
    def _channel_mismatch(unit: MutableChannelUnit, unit_cfg: Mapping) -> List[str]:
        channels = unit_cfg.get("channels")
        if not channels:
            return []
        problems = []
        for side, refs in zip(("output_related", "input_related"), config_channels(unit, channels)):
            ours = sorted(tuple(sorted(ref_to_dict(r).items())) for r in getattr(unit, side))
            theirs = sorted(tuple(sorted(ref_to_dict(r).items())) for r in refs)
            if ours != theirs:
                problems.append(f"unit {unit.name}: {side} channels differ from the model's")
        return problems

    def _apply_fixed(self, units: Sequence[MutableChannelUnit]) -> None:
        for unit in units:
            for ref in unit.related_refs:
                hit = next((f for f in self.fixed if ref.name == f or ref.name.startswith(f + ".")), None)
                if hit is not None and not unit.fixed:
                    unit.fix(f"fixed by the user ({hit!r})")

    def _plan_conversion(self, model: nn.Module, mutable: Sequence[MutableChannelUnit]) -> Dict[str, object]:
        """DynamicOps for the mutable units' layers; a unit with a layer that has none is fixed (strict: error)."""
        plan: Dict[str, object] = {}
        dynamic_already = set()
        for unit in mutable:
            try:
                unit.check_layers(model)
            except ConfigError as error:
                if self.strict:
                    raise
                warnings.warn(f"{error}; the unit is not pruned", stacklevel=3)
                unit.fix(str(error))
                continue
            for ref in unit.related_refs:
                if ref.name not in plan:
                    layer = get_layer(model, ref, f"unit {unit.name}")
                    if is_dynamic(layer):
                        dynamic_already.add(ref.name)
                    plan[ref.name] = to_dynamic_layer(layer)
            missing = [n for n in unit.module_names() if plan[n] is None]
            if missing:
                kinds = ", ".join(f"{n!r} ({type(model.get_submodule(n)).__name__})" for n in missing)
                message = f"unit {unit.name}: layers {kinds} have no DynamicOp"
                if self.strict:
                    raise ConfigError(f"{message}; exclude them with fixed=[...]")
                warnings.warn(f"{message}; the unit is not pruned", stacklevel=3)
                unit.fix("a layer has no DynamicOp")
        needed = {n for u in mutable if u.is_mutable for n in u.module_names() if n in plan}
        return {n: plan[n] for n in needed if n not in dynamic_already}

    def _config_counts(self, units: Sequence[MutableChannelUnit]) -> Dict[str, int]:
        """Validate the config's choices (all of them) before anything is applied."""
        counts = {}
        for unit in units:
            unit_cfg = self.units_cfg.get(unit.name, {})
            if "choice" in unit_cfg:
                choice = lenient_config_choice(unit, unit_cfg["choice"], self._config_report)
                if choice is not None:
                    counts[unit.name] = self._count_for(unit, choice)
        return counts

    # --------------------------------------------------------------------------------------------------- choices
    @property
    def mutable_units(self) -> List[MutableChannelUnit]:
        return [u for u in self.units if u.is_mutable]

    def _require_prepared(self) -> None:
        if self._assembler is None:
            raise ConfigError("the ChannelMutator is not prepared; call prepare_from_supernet(model) first")

    @staticmethod
    def _count_for(unit: MutableChannelUnit, choice) -> int:
        count = unit.choice_to_count(choice)
        if not unit.is_mutable and count != unit.num_channels:
            raise ChannelSelectionError(f"unit {unit.name}: not prunable ({unit.reason or 'fixed'}); only the "
                                        f"full width is allowed, got {choice!r}")
        return count

    def set_choices(self, choices: Mapping[str, Any]) -> None:
        """Set the width of the named units; all entries are validated first, so a bad one changes nothing."""
        self._require_prepared()
        if not isinstance(choices, Mapping):
            raise ConfigError(f"set_choices takes a dict {{unit name: choice}}, got {type(choices).__name__}")
        unknown = [name for name in choices if name not in self._by_name]
        if unknown:
            raise ConfigError(f"set_choices: unknown unit names {unknown}")
        counts = {name: self._count_for(self._by_name[name], choice) for name, choice in choices.items()}
        with self._assembler.deferred():
            for name, count in counts.items():
                unit = self._by_name[name]
                if unit.is_mutable:
                    unit.apply_count(count)

    def selection_state(self) -> Dict[str, Optional[torch.Tensor]]:
        """``{unit name: kept unit channels (sorted int64 CPU index) or None = all}`` for every unit: the one saved
        form of the selection (:mod:`pyprune.units.saved_selection`), in the model's state_dict and in the
        algorithms' checkpoints."""
        self._require_prepared()
        return selection_state(self.units)

    def load_selection_state(self, state, where: str = "load_selection_state") -> None:
        """Make the units keep what :meth:`selection_state` saved. Every unit is validated first (ConfigError
        naming the unit, nothing changed), then all are applied in one assembler pass."""
        self._require_prepared()
        apply_selections(checked_selections(self.units, state, where), self._assembler)

    def subnet_key(self) -> Tuple:
        """A hashable key of the current subnet: equal keys mean the same channels everywhere (what a cache of
        per-subnet work, e.g. :class:`pyprune.graphs.GraphedTrainStep`, is keyed by). Prefix units answer their
        counts, so the same choices give the same key again; units that rank channels answer their selection's
        version, which changes whenever they re-rank. Cheap: no tensor is read."""
        return tuple([u.selection_key for u in self.units if u.is_mutable])

    @property
    def current_choices(self) -> Dict[str, Any]:
        return {u.name: u.current_choice for u in self.mutable_units}

    @property
    def choice_template(self) -> Dict[str, Any]:
        """``{unit name: choice}`` for every mutable unit: the structure :meth:`set_choices` takes."""
        return self.current_choices

    def sample_choices(self) -> Dict[str, Any]:
        """A random choice for every mutable unit (not applied)."""
        return {u.name: u.sample_choice() for u in self.mutable_units}

    def set_global_ratio(self, ratio: float) -> None:
        """Keep about ``ratio`` of the channels of every mutable unit."""
        if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool) or not math.isfinite(ratio) \
                or not 0.0 < ratio <= 1.0:
            raise ChannelSelectionError(f"set_global_ratio: ratio must be in (0, 1], got {ratio!r}")
        self.set_choices({u.name: u.choice_from_ratio(float(ratio)) for u in self.mutable_units})

    def update_importance(self) -> None:
        """Call after ``loss.backward()``: units that learn importance from gradients (Taylor) accumulate it."""
        for unit in self.mutable_units:
            if hasattr(unit, "update_importance"):
                unit.update_importance()

    def fix_channel_mutables(self) -> None:
        """Freeze every unit at its current width (mmrazor's name; see ``MutableChannelUnit.fix_chosen``)."""
        for unit in self.units:
            unit.fix_chosen()

    def reset_importance(self) -> None:
        for unit in self.mutable_units:
            if hasattr(unit, "reset_importance"):
                unit.reset_importance()

    # ---------------------------------------------------------------------------------------------------- config
    def config_template(self, only_mutable_units: bool = False, with_unit_init_args: bool = False,
                        with_channels: bool = False) -> Dict[str, Any]:
        """The pruning structure as a JSON-serialisable dict that :meth:`from_config` reads back (mmrazor layout)."""
        units = self.mutable_units if only_mutable_units else self.units
        config: Dict[str, Any] = {
            "type": "ChannelMutator",
            "channel_unit_cfg": {
                "type": self.unit_class.__name__,
                "default_args": copy.deepcopy(self.unit_default_args),
                "units": {u.name: u.config_template(with_unit_init_args, with_channels) for u in units},
            },
            "parse_cfg": jsonable_parse_cfg(self.parse_cfg),
        }
        if self.fixed:
            config["fixed"] = list(self.fixed)
        if self.strict:
            config["strict"] = True
        return config

    # ---------------------------------------------------------------------------------------------------- export
    def export(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` with every DynamicOp replaced by its plain compact module; ``model`` is kept.
        An HF ``PreTrainedModel`` gets the config of its new widths (:mod:`pyprune.mutators.hf_export`)."""
        self._require_prepared()  # an unprepared mutator would hand back the full model as if it were pruned
        return attach_hf_config(export_static(copy_module(model, share=_dynamic_layer_tensors(model))))

    def summary(self, model: nn.Module, example_input) -> PruningSummary:
        """Params and FLOPs of the full model and of the current subnet (``print()`` it for a table).

        ``example_input``: in any form :func:`pyprune.tracing.example_inputs.as_call_args` takes (a tensor, a
        shape, a tuple of positional inputs, a list of images, a dict of keyword inputs, a DemoInput or callable).
        """
        inputs = as_call_args(example_input, model=model)
        return make_summary(full_width_export(model), self.export(model), inputs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.unit_class.__name__}, {len(self.mutable_units)} mutable of "
                f"{len(self.units)} units)")


def _half_count(unit: MutableChannelUnit) -> int:
    """The count ``set_global_ratio(0.5)`` gives ``unit``; for units with candidate widths (one-shot, slimmable)
    their smallest one; the full width (nothing to check) when the unit takes neither."""
    for choice in (lambda: unit.choice_from_ratio(0.5), lambda: unit.min_choice):
        try:
            return unit.choice_to_count(choice())
        except (ChannelSelectionError, ConfigError):
            continue
    return unit.num_channels


def full_width_export(model: nn.Module) -> nn.Module:
    """A plain copy of the prepared ``model`` with every channel (its dynamic layers reset to full width); ``model``
    is kept."""
    full = copy_module(model, share=_dynamic_layer_tensors(model))
    for layer in [m for m in full.modules() if isinstance(m, ops.DynamicChannelMixin)] + \
            list(ops.channel_parameters(full)):
        layer.set_out_index(None)
        layer.set_in_index(None)
    return export_static(full)


def _dynamic_layer_tensors(model: nn.Module) -> List[Tensor]:
    """The parameters and buffers of ``model``'s DynamicOps: an export replaces those layers by compact copies
    (``op.export()`` clones even what it keeps whole), so the model's copy may refer to them instead of copying.
    Not those of a layer in compact training mode: there a new selection on the copy swaps the tensors' ``.data``,
    which would reach the original through a shared tensor."""
    return [tensor for module in model.modules()
            if isinstance(module, ops.DynamicChannelMixin) and not module.tensor_provider.holds(module)
            for tensor in list(module._parameters.values()) + list(module._buffers.values()) if tensor is not None]


def export_static(model: nn.Module) -> nn.Module:
    """Replace (in place) every DynamicOp in ``model`` by ``op.export()`` (parameters several layers hold and keep
    the same channels of, such as tied input / output embeddings, stay shared); returns ``model``."""
    selection_hooks.release(model)  # plain layers now: its state_dict carries no selection any more
    # Dynamic containers first, innermost first, one at a time (an outer one then holds the plain inner one); their
    # export keeps their DynamicOps or exports them itself
    for name in [n for n, m in model.named_modules() if isinstance(m, DynamicContainer)][::-1]:
        replace_modules(model, {name: model.get_submodule(name).export()})
    mixin = ops.DynamicChannelMixin
    replacements = {}
    for name, module in model.named_modules():
        if isinstance(module, mixin):
            static = module.export()
            static.train(module.training)
            replacements[name] = static
    ops.retie_exported(model, replacements)  # a tensor several layers hold (tied embeddings) stays one Parameter
    replace_modules(model, replacements)
    ops.export_channel_parameters(model)
    ops.release_read_layers(model)  # the exported layers hold the compact tensors their readers now read
    left = [name for name, m in model.named_modules()
            if isinstance(m, mixin) or type(m).__module__.startswith("pyprune.ops")]
    if left:
        raise ConfigError(f"export left DynamicOps in the model: {left}")
    return model


def _check_structure_covers(model: nn.Module, specs: Sequence[UnitSpec]) -> None:
    """A structure read from a config must name every prunable layer of ``model``: a layer in no unit would read
    channels that a unit prunes without being told (e.g. a ResNet-18 structure on a ResNet-34)."""
    named = {ref.name for spec in specs for ref in spec.output_related + spec.input_related}
    missing = [name for name, module in model.named_modules()
               if name not in named and ops.is_prunable_layer(module) and not any(
                   name.startswith(prefix + ".") for prefix in named)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"the structure config does not cover the model: {len(missing)} prunable layers are in "
                          f"no unit ({shown}); was it saved from another model?")

