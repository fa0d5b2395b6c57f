"""MutableChannelContainer: one layer side's channels made of several mutable channels, each on a range.

mmrazor registers a container on every side of a dynamic layer and each unit's mutable channel on the range of the
side it covers; the side's mask is the ranges' masks concatenated. Code built that way runs here::

    conv.register_mutable_attr('out_channels', MutableChannelContainer(conv.out_channels))
    MutableChannelContainer.register_mutable_channel_to_module(conv, mutable_a, True, 0, 8)
    MutableChannelContainer.register_mutable_channel_to_module(conv, mutable_b, True, 8, 16)

A hand-built layer then runs at the concatenated mask (the container follows its channels and the layer follows the
container); ``ChannelMutator(parse_cfg=dict(type='Predefined'))`` makes one unit per distinct channel, covering its
range of every side it is registered on (:mod:`pyprune.units.predefined`). A range with no channel registered keeps
all its channels.
"""
from typing import Dict, Iterator, Tuple

import torch
from torch import Tensor

from ..errors import ChannelSelectionError, ConfigError
from ..registry import MODELS
from .mutable_channel import FixedTwiceError, MaskFollowers
from .mutable_value import DumpChosen

__all__ = ["MutableChannelContainer"]

Range = Tuple[int, int]


@MODELS.register_module()
class MutableChannelContainer:
    """A mutable channel over ``num_channels`` whose mask is the concatenation of the mutable channels registered on
    ``[start, end)`` ranges (:meth:`register_mutable`); ranges nobody registered keep every channel.

    Its choice is that bool mask ``[num_channels]`` and cannot be set directly (set the registered channels).
    """

    def __init__(self, num_channels: int, **kwargs):
        if not isinstance(num_channels, int) or isinstance(num_channels, bool) or num_channels < 1:
            raise ConfigError(f"MutableChannelContainer: num_channels must be a positive int, got {num_channels!r}")
        self.num_channels = num_channels
        self.name = ""
        self.is_fixed = False
        self.mutable_channels: Dict[Range, object] = {}  # (start, end) -> mutable channel, sorted by start
        self._followers = MaskFollowers()

    # ------------------------------------------------------------------------------------------------- building
    def register_mutable(self, mutable_channel, start: int, end: int) -> None:
        """Let ``mutable_channel`` (``end - start`` channels wide) decide channels ``[start, end)``. A range that
        is out of bounds, of another width or overlapping a registered one raises ConfigError; nothing changes."""
        where = f"MutableChannelContainer({self.num_channels} channels)"
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)) \
                or not 0 <= start < end <= self.num_channels:
            raise ConfigError(f"{where}: a range must satisfy 0 <= start < end <= {self.num_channels}, got "
                              f"[{start!r}, {end!r})")
        width = getattr(mutable_channel, "num_channels", None)
        if width != end - start or not hasattr(mutable_channel, "current_mask"):
            raise ConfigError(f"{where}: range [{start}, {end}) needs a mutable channel of {end - start} channels, "
                              f"got {mutable_channel!r}")
        for (s, e), existing in self.mutable_channels.items():
            if (s, e) == (start, end) and existing is mutable_channel:
                return  # registered already (mmrazor's units register a shared channel once per layer)
            if start < e and s < end:
                raise ConfigError(f"{where}: range [{start}, {end}) overlaps the registered range [{s}, {e})")
        self.mutable_channels[(start, end)] = mutable_channel
        self.mutable_channels = dict(sorted(self.mutable_channels.items()))
        mutable_channel.add_follower(self)
        self._mutable_changed()

    @classmethod
    def register_mutable_channel_to_module(cls, module, mutable, is_to_output_channel: bool = True, start: int = 0,
                                           end: int = -1) -> None:
        """Register ``mutable`` on ``[start, end)`` of the container that ``module`` has on its output
        (``is_to_output_channel``) or input side; ``end=-1``: ``start + mutable.num_channels`` (mmrazor reads the
        current choice there, which is that width while the channel is full). ConfigError when the side holds no
        container."""
        attr = "out_channels" if is_to_output_channel else "in_channels"
        container = module.get_mutable_attr(attr) if hasattr(module, "get_mutable_attr") else None
        if not isinstance(container, cls):
            name = getattr(module, "pyprune_name", type(module).__name__)
            raise ConfigError(f"{name} ({type(module).__name__}): its {attr} side has no MutableChannelContainer "
                              f"registered (register_mutable_attr({attr!r}, MutableChannelContainer(n)) first), got "
                              f"{container!r}")
        if end == -1:
            end = start + getattr(mutable, "num_channels", 0)
        container.register_mutable(mutable, start, end)

    def ranges(self) -> Iterator[Tuple[int, int, object]]:
        """``(start, end, mutable channel)`` of every registered range, by start."""
        for (start, end), mutable in self.mutable_channels.items():
            yield start, end, mutable

    # --------------------------------------------------------------------------------------------------- choice
    @property
    def current_choice(self) -> Tensor:
        """Bool ``[num_channels]``: the registered masks in range order, all True where nothing is registered."""
        pieces, last = [], 0
        for start, end, mutable in self.ranges():
            if start > last:
                pieces.append(torch.ones(start - last, dtype=torch.bool))
            pieces.append(mutable.current_mask.to(device="cpu", dtype=torch.bool))
            last = end
        if last < self.num_channels:
            pieces.append(torch.ones(self.num_channels - last, dtype=torch.bool))
        return torch.cat(pieces)

    @current_choice.setter
    def current_choice(self, choice) -> None:
        raise NotImplementedError("MutableChannelContainer: its mask cannot be set directly; set the mutable "
                                  "channels registered on its ranges")

    @property
    def current_mask(self) -> Tensor:
        """Bool ``[num_channels]`` (see :attr:`current_choice`)."""
        return self.current_choice

    @property
    def activated_channels(self) -> int:
        return int(self.current_mask.sum())

    def fix_chosen(self, chosen=None) -> None:
        """Freeze (mmrazor's base channel; a ``chosen`` would have to set the mask, which a container refuses)."""
        if self.is_fixed:
            raise FixedTwiceError("MutableChannelContainer is fixed already; fix_chosen cannot be called again")
        if chosen is not None:
            raise ChannelSelectionError("MutableChannelContainer: fix_chosen cannot set a choice; fix the mutable "
                                        "channels registered on its ranges")
        self.is_fixed = True

    def dump_chosen(self) -> DumpChosen:
        """``DumpChosen(chosen=activated channel count, meta={'max_channels': num_channels})``."""
        return DumpChosen(chosen=self.export_chosen(), meta=dict(max_channels=self.num_channels))

    def export_chosen(self) -> int:
        return self.activated_channels

    # ------------------------------------------------------------------------------------------------ following
    def add_follower(self, follower) -> None:
        self._followers.add(follower)

    def _mutable_changed(self) -> None:
        """A registered channel changed its mask: so did this container."""
        self._followers.notify()

    def __repr__(self) -> str:
        ranges = ", ".join(f"[{s}, {e})" for s, e, _ in self.ranges())
        return f"MutableChannelContainer(num_channels={self.num_channels}, ranges=[{ranges}])"
