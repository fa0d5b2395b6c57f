"""``register_mutable_attr`` on DynamicOps: mmrazor's way of telling a dynamic layer which mutable drives it.

Channel attributes: ``op.register_mutable_attr(attr, mutable)`` with ``attr`` one of ``'out_channels'`` /
``'out_features'`` (the output side), ``'in_channels'`` / ``'in_features'`` (the input side) or ``'num_features'``
(a norm's one side), and ``mutable`` a mutable channel spanning that whole side (``mutable.num_channels`` equal to
the layer's channel count on it): a :class:`~pyprune.units.SquentialMutableChannel`,
``mutable.expand_mutable_channel(k)`` for a Linear that reads ``k`` features per channel, or a
:class:`~pyprune.units.mutable_channel_container.MutableChannelContainer` holding several channels on ranges of the
side. Op classes that mutate more than channels name those attributes in ``_value_attrs`` and check them in
``_register_value_attr`` (``BigNasConv2d``: ``'kernel_size'``, :mod:`pyprune.ops.predefined`); any other attribute
is refused with a ConfigError.

Who decides the width:

* ``ChannelMutator(parse_cfg=dict(type='Predefined'))`` reads the registered channels (one unit per distinct
  channel); from then on the units set the layer (and the channels follow the units).
* Until something else sets the layer's selection, a layer follows its registered channels itself: each new mask is
  pushed to it (``mutable.current_choice = 4`` -> the layer runs and exports at 4 channels), as mmrazor's dynamic
  layers read their mutables. The first selection set by anyone else (a unit, ``set_out_channels``) ends that: the
  layer keeps what it is given.
"""
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import ConfigError

__all__ = ["MutableAttrs", "CHANNEL_ATTRS"]

# attribute name -> side of the layer it sizes (True: output channels)
CHANNEL_ATTRS = {"out_channels": True, "out_features": True, "num_features": True, "in_channels": False,
                 "in_features": False}

_FOLLOWS = "_follows_mutables_at"  # the selection version the layer last took from its mutables (absent: never)


class MutableAttrs:
    """Mixin of every DynamicOp: the mutables registered on it (stored in ``__dict__``, not as submodules, so the
    model's parameters and ``state_dict`` are unchanged)."""

    _value_attrs: Tuple[str, ...] = ()  # non-channel attributes the class takes (checked by _register_value_attr)

    def register_mutable_attr(self, attr: str, mutable: Any) -> None:
        """Let ``mutable`` drive ``attr`` of this layer (see the module doc for what is supported)."""
        attrs = self.__dict__.setdefault("_mutable_attrs", {})
        if attr in type(self)._value_attrs:
            self._register_value_attr(attr, mutable)
            attrs[attr] = mutable
            return
        if attr not in CHANNEL_ATTRS:
            raise ConfigError(f"{self._mutable_where()}: register_mutable_attr supports "
                              f"{sorted(CHANNEL_ATTRS) + sorted(type(self)._value_attrs)}; got {attr!r}")
        width = getattr(mutable, "num_channels", None)
        is_output = CHANNEL_ATTRS[attr] or type(self).shares_selection(self)
        expected = type(self).channel_counts(self)[0 if is_output else 1]
        if width != expected or not hasattr(mutable, "current_mask"):
            raise ConfigError(f"{self._mutable_where()}: a mutable for {attr!r} must span the layer's {expected} "
                              f"channels, got {mutable!r} ({width} channels); register a MutableChannelContainer "
                              f"for ranges of a side")
        attrs["out_channels" if is_output else "in_channels"] = mutable
        if hasattr(mutable, "add_follower"):
            mutable.add_follower(self)
        self.__dict__[_FOLLOWS] = self.selection_version  # registering is asking to follow, whoever set it before
        self._mutable_changed()

    def _register_value_attr(self, attr: str, mutable: Any) -> None:
        """Check a mutable for one of ``_value_attrs`` (raise ConfigError naming the layer when it does not fit)."""
        raise NotImplementedError(f"{type(self).__name__} lists {attr!r} in _value_attrs but does not check it")

    def get_mutable_attr(self, attr: str) -> Optional[Any]:
        """The mutable registered for ``attr`` (``None`` when there is none)."""
        attrs = self.__dict__.get("_mutable_attrs", {})
        if attr in type(self)._value_attrs:
            return attrs.get(attr)
        if attr not in CHANNEL_ATTRS:
            return None
        key = "out_channels" if CHANNEL_ATTRS[attr] or type(self).shares_selection(self) else "in_channels"
        return attrs.get(key)

    @property
    def mutable_attrs(self) -> Dict[str, Any]:
        """``{'out_channels' / 'in_channels' / value attribute: mutable}`` as registered."""
        return dict(self.__dict__.get("_mutable_attrs", {}))

    @property
    def follows_mutables(self) -> bool:
        """Whether the layer still takes its selection from its registered channels (see the module doc)."""
        return self.__dict__.get(_FOLLOWS) == self.selection_version

    def _mutable_changed(self) -> None:
        """A registered channel has a new mask: take it, unless someone else has set the selection since."""
        if not self.follows_mutables:
            return
        attrs = self.__dict__.get("_mutable_attrs", {})
        for key, is_output in (("out_channels", True), ("in_channels", False)):
            mutable = attrs.get(key)
            if mutable is None:
                continue
            mask = mutable.current_mask.to(device=self._device() or "cpu", dtype=torch.bool)
            if is_output:
                self.set_out_channels(mask)  # validated: a mask the layer cannot run raises, naming it
            else:
                self.set_in_channels(mask)
        self.__dict__[_FOLLOWS] = self.selection_version

    def _mutable_where(self) -> str:
        return f"{getattr(self, 'pyprune_name', type(self).__name__)} ({type(self).__name__})"
