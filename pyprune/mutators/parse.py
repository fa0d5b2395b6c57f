"""Reading a ChannelMutator's configs: ``channel_unit_cfg``, ``parse_cfg`` and units described by their channels."""
import json
import os
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..channels import UnitSpec
from ..errors import ConfigError
from ..registry import TASK_UTILS
from ..units import unit_class
from ..tracing.outputs import check_fixed_outputs
from ..tracing.example_inputs import StructuredDemoInput, check_demo_input, input_config, is_shape, resolve
from ..units.analyzer import DEFAULT_DEMO_INPUT, TRACER_TYPES, ChannelAnalyzer
from ..units.channel_config import channel_refs, repeats_a_shared_layer
from ..units.leniency import LenientReport

PARSE_TYPES = ("ChannelAnalyzer", "Config", "Predefined")


def normalize_unit_cfg(channel_unit_cfg) -> Dict[str, Any]:
    """``'L1MutableChannelUnit'`` or ``dict(type, default_args, units)`` -> the full dict (type checked).

    ``units`` may be a dict ``{unit name: {'init_args': ..., 'choice': ..., 'channels': ...}}`` or the path of a
    JSON file holding one (or a whole mutator config, as mmrazor writes them).
    """
    if isinstance(channel_unit_cfg, (str, type)):
        channel_unit_cfg = {"type": channel_unit_cfg}
    if not isinstance(channel_unit_cfg, Mapping):
        raise ConfigError(f"channel_unit_cfg must be a unit type name or a dict, got {channel_unit_cfg!r}")
    channel_unit_cfg = {k: v for k, v in channel_unit_cfg.items() if k != "_scope_"}
    unknown = set(channel_unit_cfg) - {"type", "default_args", "units"}
    if unknown:
        raise ConfigError(f"channel_unit_cfg: unknown keys {sorted(unknown)}; expected type, default_args, units")
    cls = unit_class(channel_unit_cfg.get("type", "SequentialMutableChannelUnit"))
    default_args = dict(channel_unit_cfg.get("default_args") or {})
    # mmrazor's switch for predefined models whose layers are dynamic already: pyprune uses such layers as they are
    default_args.pop("unit_predefined", None)
    units = _load_units(channel_unit_cfg.get("units") or {})
    for name, unit_cfg in units.items():
        if not isinstance(unit_cfg, Mapping):
            raise ConfigError(f"channel_unit_cfg.units[{name!r}] must be a dict, got {unit_cfg!r}")
        unknown = set(unit_cfg) - {"init_args", "choice", "channels"}
        if unknown:
            raise ConfigError(f"channel_unit_cfg.units[{name!r}]: unknown keys {sorted(unknown)}")
    return {"type": cls.__name__, "class": cls, "default_args": default_args, "units": units}


def _load_units(units) -> Dict[str, Dict[str, Any]]:
    if isinstance(units, (str, os.PathLike)):
        try:
            with open(units) as handle:
                loaded = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"channel_unit_cfg.units: cannot read {units!r}: {error}") from None
        if isinstance(loaded, Mapping) and "channel_unit_cfg" in loaded:
            loaded = loaded["channel_unit_cfg"].get("units", {})
        units = loaded
    if not isinstance(units, Mapping):
        raise ConfigError(f"channel_unit_cfg.units must be a dict of unit configs, got {type(units).__name__}")
    return {str(name): dict(cfg) if isinstance(cfg, Mapping) else cfg for name, cfg in units.items()}


def normalize_parse_cfg(parse_cfg) -> Dict[str, Any]:
    """Fill defaults and check ``type`` / ``tracer_type`` / ``demo_input`` / ``fixed_outputs``; returns a
    JSON-friendly dict.

    ``parse_cfg`` may also be a :class:`~pyprune.units.ChannelAnalyzer` (as mmrazor allows), and ``demo_input`` a
    shape, a tensor, a tuple of positional inputs, a list (of images), a dict of keyword inputs, a DemoInput (object
    or config dict) or a callable returning one of those (see :mod:`pyprune.tracing.example_inputs`).
    """
    if isinstance(parse_cfg, ChannelAnalyzer):
        parse_cfg = dict(type="ChannelAnalyzer", demo_input=parse_cfg.demo_input, tracer_type=parse_cfg.tracer_type)
    parse_cfg = dict(parse_cfg or {})
    demo = parse_cfg.pop("_demo_input", None)  # a parse_cfg normalised before (a mutator's own) keeps its input
    parse_cfg.pop("_scope_", None)  # mmengine's registry scope ('mmrazor' in mmrazor's defaults): one registry here
    # mmrazor's "trace, then take the units' init args and choices from the config" is what ChannelAnalyzer does here
    parse_cfg.pop("from_cfg", None)
    parse_cfg.setdefault("type", "ChannelAnalyzer")
    if parse_cfg["type"] not in PARSE_TYPES:
        raise ConfigError(f"parse_cfg: unknown type {parse_cfg['type']!r}; known: {list(PARSE_TYPES)}")
    if parse_cfg["type"] in ("Config", "Predefined"):
        return parse_cfg
    unknown = set(parse_cfg) - {"type", "demo_input", "tracer_type", "fixed_outputs"}
    if unknown:
        raise ConfigError(f"parse_cfg: unknown keys {sorted(unknown)}; expected type, demo_input, tracer_type, "
                          f"fixed_outputs")
    try:
        fixed_outputs = check_fixed_outputs(parse_cfg.get("fixed_outputs"))
    except ConfigError as error:
        raise ConfigError(f"parse_cfg: {error}") from None
    if fixed_outputs is None:
        parse_cfg.pop("fixed_outputs", None)
    else:
        parse_cfg["fixed_outputs"] = fixed_outputs
    parse_cfg.setdefault("tracer_type", "auto")
    if parse_cfg["tracer_type"] not in TRACER_TYPES:
        raise ConfigError(f"parse_cfg: unknown tracer_type {parse_cfg['tracer_type']!r}; known: "
                          f"{sorted(TRACER_TYPES)}")
    if demo is None:
        demo = parse_cfg.setdefault("demo_input", DEFAULT_DEMO_INPUT)
    try:
        check_demo_input(demo)
        parse_cfg["demo_input"] = demo_description(demo)
    except ConfigError as error:
        raise ConfigError(f"parse_cfg: {error}") from None
    parse_cfg["_demo_input"] = demo  # what is run; "demo_input" is what a config file records
    return parse_cfg


def demo_description(demo) -> Any:
    """What a config file records of a demo input: its shape where it is one float tensor of a known shape (as
    mmrazor writes it), else a StructuredDemoInput config of its shapes and dtypes; None for a maker (a DemoInput
    or callable) whose output is known only once it is called with the model (:func:`demo_inputs` records it)."""
    if isinstance(demo, Mapping) and demo.get("type") in ("StructuredDemoInput", StructuredDemoInput):
        return {**dict(demo), "type": "StructuredDemoInput"}
    if is_shape(demo):
        return tuple(demo)
    if isinstance(demo, Mapping) and "type" in demo:
        demo = TASK_UTILS.build(dict(demo))
    if isinstance(demo, StructuredDemoInput):
        return {"type": "StructuredDemoInput", "args": demo.args, "kwargs": demo.kwargs}
    if hasattr(demo, "get_data") and is_shape(getattr(demo, "input_shape", None)):  # mmrazor's DefaultDemoInput
        return tuple(demo.input_shape)
    if hasattr(demo, "get_data") or callable(demo):
        return None
    return input_config(demo)


def jsonable_parse_cfg(parse_cfg: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in parse_cfg.items() if not k.startswith("_")}
    if "demo_input" in out:
        if out["demo_input"] is None:  # a maker not called yet: the reloaded config traces the default input
            del out["demo_input"]
        elif is_shape(out["demo_input"]):
            out["demo_input"] = list(out["demo_input"])
    return out


def demo_inputs(parse_cfg: Dict[str, Any], model: nn.Module):
    """The example input the tracer runs (tensors on the model's device where it makes them); a maker's output is
    recorded in ``parse_cfg['demo_input']`` for the config file."""
    demo = parse_cfg.get("_demo_input", parse_cfg["demo_input"])
    value = resolve(demo, model)
    if parse_cfg.get("demo_input") is None:
        parse_cfg["demo_input"] = input_config(value)
    return value


def specs_from_channels(units_cfg: Dict[str, Dict[str, Any]], model: Optional[nn.Module] = None) -> List:
    """UnitSpecs from configs that list each unit's channels (``parse_cfg=dict(type='Config')``): no tracing.

    Entries are read by :func:`channel_refs` (mmrazor's spellings included). With ``model``, a norm or depthwise conv
    that mmrazor lists on both sides of a unit keeps only its output-side entry, as pyprune lists it.

    ``channels`` may also hold ``groups`` (equal blocks a selection keeps) and ``fixed`` (why the unit is never
    pruned), which pyprune writes and mmrazor's layout lacks.
    """
    specs = []
    for name, cfg in units_cfg.items():
        channels = cfg.get("channels")
        if not isinstance(channels, Mapping):
            raise ConfigError(f"unit {name}: parse_cfg type 'Config' needs 'channels' for every unit")
        entries = list(channels.get("output_related", [])) + list(channels.get("input_related", []))
        if not entries:
            raise ConfigError(f"unit {name}: no channels listed")
        num_channels = (cfg.get("init_args") or {}).get("num_channels")
        if num_channels is None:  # pyprune writes it; otherwise the first range is the unit's own width
            first = channel_refs(entries[:1], None, None, name)[0]
            num_channels = first.width // first.expand
        output_related = channel_refs(channels.get("output_related", []), True, num_channels, name)
        input_related = channel_refs(channels.get("input_related", []), False, num_channels, name)
        if model is not None:
            input_related = [ref for ref in input_related
                             if not repeats_a_shared_layer(ref, output_related, model)]
        fixed = channels.get("fixed", "")
        spec = UnitSpec(num_channels=num_channels, output_related=output_related, input_related=input_related,
                        groups=int(channels.get("groups", 1)), fixed=bool(fixed), reason=str(fixed or ""))
        specs.append((name, spec))
    return specs


def lenient_config_choice(unit, choice, report: LenientReport):
    """A unit's ``choice`` from a config, as mmrazor takes it: a channel count above the unit's width keeps every
    channel (reported; DMCP's MobileNetV2 config asks 693 of 576), a choice for a unit that cannot be pruned is
    skipped (reported; returns None) unless it is the full width. Anything else is returned for validation."""
    is_count = isinstance(choice, int) and not isinstance(choice, bool)
    if is_count and unit.choice_mode == "number" and choice > unit.num_channels:
        report.clamp(f"{unit.name} ({choice} > {unit.num_channels})")
        choice = unit.num_channels
    if not unit.is_mutable:
        try:
            full = unit.width_to_count(choice) == unit.num_channels
        except ValueError:
            full = False
        if not full:
            report.ignore([unit.name], "choices for units that are not prunable")
            return None
    return choice
