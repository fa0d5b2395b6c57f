"""Name -> class lookup of channel units, so configs can say ``"type": "L1MutableChannelUnit"``.

Units live in the shared :data:`pyprune.registry.MODELS` registry (as in mmrazor, where units are ``MODELS``);
:data:`UNITS` is the view of the ones that are channel units. A unit class registered with
``@MODELS.register_module()`` (mmrazor style) or ``@register_unit`` is found by name either way.
"""
from typing import Dict, Type

from ..errors import ConfigError
from ..registry import MODELS

UNITS: Dict[str, type] = {}


def register_unit(cls: Type) -> Type:
    """Class decorator: make ``cls`` buildable from a config by its class name."""
    UNITS[cls.__name__] = cls
    MODELS.register_module(module=cls, force=True)
    return cls


def unit_class(type_name) -> Type:
    """The unit class registered as ``type_name`` (a class is returned as is); unknown or not a unit ->
    ConfigError naming the known unit types."""
    from .base import MutableChannelUnit
    if isinstance(type_name, type):
        found = type_name
    else:
        found = MODELS.get(type_name, None) if isinstance(type_name, str) else None
    if not (isinstance(found, type) and issubclass(found, MutableChannelUnit)):
        known = sorted(set(UNITS) | {n for n, c in MODELS.module_dict.items()
                                     if isinstance(c, type) and issubclass(c, MutableChannelUnit)})
        raise ConfigError(f"unknown channel unit type {type_name!r}; known types: {known}")
    return found
