"""``register_mutable_attr`` on DynamicOps: mmrazor's way of telling a dynamic layer which mutable drives it.

Supported subset: the channel attributes. ``op.register_mutable_attr(attr, mutable)`` with ``attr`` one of
``'out_channels'`` / ``'out_features'`` (the output side), ``'in_channels'`` / ``'in_features'`` (the input side) or
``'num_features'`` (a norm's one side), and ``mutable`` a mutable channel spanning that whole side
(``mutable.num_channels`` equal to the layer's channel count on it), e.g. a
:class:`~pyprune.units.SquentialMutableChannel` or ``mutable.expand_mutable_channel(k)`` for a Linear that reads
``k`` features per channel. Ops only store the mutable; ``ChannelMutator(parse_cfg=dict(type='Predefined'))`` reads
them (one unit per distinct mutable). Other attributes (kernel size, depth, heads) and partial ranges of a side
(mmrazor's ``MutableChannelContainer`` with several mutables) are refused with a ConfigError.
"""
from typing import Any, Dict, Optional

from ..errors import ConfigError

__all__ = ["MutableAttrs", "CHANNEL_ATTRS"]

# attribute name -> side of the layer it sizes (True: output channels)
CHANNEL_ATTRS = {"out_channels": True, "out_features": True, "num_features": True, "in_channels": False,
                 "in_features": False}


class MutableAttrs:
    """Mixin of every DynamicOp: the mutables registered on its channel sides (stored in ``__dict__``, not as
    submodules, so the model's parameters and ``state_dict`` are unchanged)."""

    def register_mutable_attr(self, attr: str, mutable: Any) -> None:
        """Let ``mutable`` drive side ``attr`` of this layer (see the module doc for what is supported)."""
        if attr not in CHANNEL_ATTRS:
            raise ConfigError(f"{self._mutable_where()}: register_mutable_attr supports {sorted(CHANNEL_ATTRS)}; "
                              f"got {attr!r}")
        width = getattr(mutable, "num_channels", None)
        is_output = CHANNEL_ATTRS[attr] or type(self).shares_selection(self)
        expected = type(self).channel_counts(self)[0 if is_output else 1]
        if width != expected:
            raise ConfigError(f"{self._mutable_where()}: a mutable for {attr!r} must span the layer's {expected} "
                              f"channels, got {mutable!r} ({width} channels); partial ranges are not supported")
        attrs = self.__dict__.setdefault("_mutable_attrs", {})
        attrs["out_channels" if is_output else "in_channels"] = mutable

    def get_mutable_attr(self, attr: str) -> Optional[Any]:
        """The mutable registered for ``attr`` (``None`` when there is none)."""
        if attr not in CHANNEL_ATTRS:
            return None
        key = "out_channels" if CHANNEL_ATTRS[attr] or type(self).shares_selection(self) else "in_channels"
        return self.__dict__.get("_mutable_attrs", {}).get(key)

    @property
    def mutable_attrs(self) -> Dict[str, Any]:
        """``{'out_channels' / 'in_channels': mutable}`` as registered."""
        return dict(self.__dict__.get("_mutable_attrs", {}))

    def _mutable_where(self) -> str:
        return f"{getattr(self, 'pyprune_name', type(self).__name__)} ({type(self).__name__})"
