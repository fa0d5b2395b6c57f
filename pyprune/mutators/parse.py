"""Reading a ChannelMutator's configs: ``channel_unit_cfg``, ``parse_cfg`` and units described by their channels."""
import json
import os
from collections.abc import Mapping
from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor, nn

from ..channels import UnitSpec, ref_from_dict
from ..errors import ConfigError
from ..units import unit_class

DEFAULT_DEMO_INPUT = (1, 3, 224, 224)
# mmrazor's tracer names and ours -> the ``tracer`` argument of pyprune.tracing.trace_channel_units.
TRACER_TYPES = {"FxTracer": "fx", "fx": "fx", "TorchFunctionTracer": "torch_function",
                "torch_function": "torch_function", "auto": "auto", "BackwardTracer": "auto"}
PARSE_TYPES = ("ChannelAnalyzer", "Config")


def normalize_unit_cfg(channel_unit_cfg) -> Dict[str, Any]:
    """``'L1MutableChannelUnit'`` or ``dict(type, default_args, units)`` -> the full dict (type checked).

    ``units`` may be a dict ``{unit name: {'init_args': ..., 'choice': ..., 'channels': ...}}`` or the path of a
    JSON file holding one (or a whole mutator config, as mmrazor writes them).
    """
    if isinstance(channel_unit_cfg, (str, type)):
        channel_unit_cfg = {"type": channel_unit_cfg}
    if not isinstance(channel_unit_cfg, Mapping):
        raise ConfigError(f"channel_unit_cfg must be a unit type name or a dict, got {channel_unit_cfg!r}")
    unknown = set(channel_unit_cfg) - {"type", "default_args", "units"}
    if unknown:
        raise ConfigError(f"channel_unit_cfg: unknown keys {sorted(unknown)}; expected type, default_args, units")
    cls = unit_class(channel_unit_cfg.get("type", "SequentialMutableChannelUnit"))
    default_args = dict(channel_unit_cfg.get("default_args") or {})
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
    """Fill defaults and check ``type`` / ``tracer_type`` / ``demo_input``; returns a JSON-friendly dict."""
    parse_cfg = dict(parse_cfg or {})
    parse_cfg.setdefault("type", "ChannelAnalyzer")
    if parse_cfg["type"] not in PARSE_TYPES:
        raise ConfigError(f"parse_cfg: unknown type {parse_cfg['type']!r}; known: {list(PARSE_TYPES)}")
    if parse_cfg["type"] == "Config":
        return parse_cfg
    unknown = set(parse_cfg) - {"type", "demo_input", "tracer_type"}
    if unknown:
        raise ConfigError(f"parse_cfg: unknown keys {sorted(unknown)}; expected type, demo_input, tracer_type")
    parse_cfg.setdefault("tracer_type", "auto")
    if parse_cfg["tracer_type"] not in TRACER_TYPES:
        raise ConfigError(f"parse_cfg: unknown tracer_type {parse_cfg['tracer_type']!r}; known: "
                          f"{sorted(TRACER_TYPES)}")
    demo = parse_cfg.setdefault("demo_input", DEFAULT_DEMO_INPUT)
    if isinstance(demo, Tensor):
        parse_cfg["demo_input"] = tuple(demo.shape)
        parse_cfg["_demo_tensor"] = demo
    elif not (isinstance(demo, Sequence) and demo and all(isinstance(d, int) and d > 0 for d in demo)):
        raise ConfigError(f"parse_cfg: demo_input must be a shape (positive ints) or a tensor, got {demo!r}")
    else:
        parse_cfg["demo_input"] = tuple(demo)
    return parse_cfg


def jsonable_parse_cfg(parse_cfg: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in parse_cfg.items() if not k.startswith("_")}
    if "demo_input" in out:
        out["demo_input"] = list(out["demo_input"])
    return out


def demo_inputs(parse_cfg: Dict[str, Any], model: nn.Module):
    """The example input the tracer runs, on the model's device."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    tensor = parse_cfg.get("_demo_tensor")
    if tensor is None:
        tensor = torch.randn(parse_cfg["demo_input"])
    return tensor.to(device)


def specs_from_channels(units_cfg: Dict[str, Dict[str, Any]]) -> List:
    """UnitSpecs from configs that list each unit's channels (``parse_cfg=dict(type='Config')``): no tracing.

    ``channels`` may also hold ``groups`` (equal blocks a selection keeps) and ``fixed`` (why the unit is never
    pruned), which pyprune writes and mmrazor's layout lacks.
    """
    specs = []
    for name, cfg in units_cfg.items():
        channels = cfg.get("channels")
        if not isinstance(channels, Mapping):
            raise ConfigError(f"unit {name}: parse_cfg type 'Config' needs 'channels' for every unit")
        try:
            output_related = [ref_from_dict(ref) for ref in channels.get("output_related", [])]
            input_related = [ref_from_dict(ref) for ref in channels.get("input_related", [])]
        except TypeError as error:
            raise ConfigError(f"unit {name}: bad channel entry: {error}") from None
        refs = output_related + input_related
        if not refs:
            raise ConfigError(f"unit {name}: no channels listed")
        first = refs[0]
        num_channels = (cfg.get("init_args") or {}).get("num_channels",
                                                         first.width // first.expand)
        fixed = channels.get("fixed", "")
        spec = UnitSpec(num_channels=num_channels, output_related=output_related, input_related=input_related,
                        groups=int(channels.get("groups", 1)), fixed=bool(fixed), reason=str(fixed or ""))
        specs.append((name, spec))
    return specs
