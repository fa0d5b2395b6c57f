"""Name -> class registry of channel units, so configs can say ``"type": "L1MutableChannelUnit"``."""
from typing import Dict, Type

from ..errors import ConfigError

UNITS: Dict[str, type] = {}


def register_unit(cls: Type) -> Type:
    """Class decorator: make ``cls`` buildable from a config by its class name."""
    UNITS[cls.__name__] = cls
    return cls


def unit_class(type_name) -> Type:
    """The unit class registered as ``type_name`` (a class is returned as is); unknown -> ConfigError."""
    if isinstance(type_name, type):
        return type_name
    if not isinstance(type_name, str) or type_name not in UNITS:
        raise ConfigError(f"unknown channel unit type {type_name!r}; known types: {sorted(UNITS)}")
    return UNITS[type_name]
