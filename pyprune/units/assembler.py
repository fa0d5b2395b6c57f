"""LayerIndexAssembler: turns unit selections into each layer's global in / out channel index."""
import contextlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import ConfigError
from .modules import get_layer, has_one_selection, module_channel_count, module_device

# (module name, is_output); norms and channel tensors use "out" for both sides since they have one channel dim.
SideKey = Tuple[str, bool]


class _Range:
    __slots__ = ("start", "end", "expand", "unit")

    def __init__(self, start: int, end: int, expand: int, unit):
        self.start, self.end, self.expand, self.unit = start, end, expand, unit


class _Side:
    """One layer side: its module, width, the unit ranges that cover it and the setter its index goes through."""
    __slots__ = ("module", "size", "ranges", "covered", "whole", "setter", "applied", "applied_index")

    def __init__(self, module, size: int, ranges: List[_Range], is_output: bool):
        self.module, self.size, self.ranges = module, size, ranges
        self.covered = sum(r.end - r.start for r in ranges)
        # The common case: one unit covers the whole side channel for channel, so its index is the side's.
        self.whole = len(ranges) == 1 and ranges[0].start == 0 and ranges[0].end == size and ranges[0].expand == 1
        self.setter = "set_out_index" if is_output or has_one_selection(module) else "set_in_index"
        # A derived cache, never read back as a selection: the units' keys and the index last pushed, only so a flush
        # can tell that the layer still holds what it would build again (someone may have set the layer since).
        self.applied, self.applied_index = None, None

    def set_index(self, index: Optional[Tensor], keys: tuple) -> None:
        getattr(self.module, self.setter)(index)
        self.applied, self.applied_index = keys, index

    def unchanged(self, keys: tuple) -> bool:
        """Whether the layer still holds the index built for these selection keys (nobody set another since)."""
        if keys != self.applied:
            return False
        current = self.module.out_index if self.setter == "set_out_index" else self.module.in_index
        return current is self.applied_index

    def selection_keys(self) -> tuple:
        return tuple([r.unit.selection_key for r in self.ranges])

    def kept(self) -> int:
        return self.size - self.covered + sum([r.unit.active_channels * r.expand for r in self.ranges])


class _Ticket:
    """A host-built index piece waiting for :meth:`_HostToDevice.copy`."""
    __slots__ = ("device", "position")

    def __init__(self, device: torch.device, position: int):
        self.device, self.position = device, position


Piece = Union[Tensor, _Ticket]


class _HostToDevice:
    """Index pieces built on the host, moved to their device in ONE copy per device.

    CUDA: the pieces are concatenated into a pinned buffer, copied with ``non_blocking=True`` (no host sync; the
    caching host allocator keeps the buffer until the copy has run) and split into views. CPU: nothing to move.
    """

    def __init__(self):
        self._pieces: Dict[torch.device, List[Tensor]] = {}
        self._moved: Dict[torch.device, Tuple[Tensor, ...]] = {}

    def add(self, piece: Tensor, device: torch.device) -> Piece:
        """``piece`` itself when it already is on ``device``; a ticket when it is a host piece to move."""
        if piece.device == device:
            return piece
        if not piece.is_cpu:  # on another device already (not a host piece): move it on its own
            return piece.to(device)
        pieces = self._pieces.setdefault(device, [])
        pieces.append(piece)
        return _Ticket(device, len(pieces) - 1)

    def copy(self) -> None:
        for device, pieces in self._pieces.items():
            pinned = device.type == "cuda"
            buffer = torch.empty(sum([p.shape[0] for p in pieces]), dtype=torch.int64, pin_memory=pinned)
            torch.cat(pieces, out=buffer)
            moved = buffer.to(device, non_blocking=pinned)
            self._moved[device] = moved.split([p.shape[0] for p in pieces])
        self._pieces = {}

    def resolve(self, piece: Piece) -> Tensor:
        return self._moved[piece.device][piece.position] if isinstance(piece, _Ticket) else piece


class LayerIndexAssembler:
    """Builds and applies every layer side's channel index from the units that cover it.

    For a layer side (a module's input or output channels) covered by the ranges ``[start, end)`` of some units,
    the global index is the concatenation, in channel order, of each unit's index expanded by ``expand`` and
    offset by ``start``; channels no unit covers are kept. When every channel is kept the index is ``None``.
    Units report changes through :meth:`unit_changed`; only the layer sides they cover are rebuilt, and within
    :meth:`deferred` the rebuild waits until the block ends (a concat consumer is rebuilt once, not per unit).
    Indices go to the DynamicOps through the trusted ``set_out_index`` / ``set_in_index``: this is the one way a
    layer of a prepared model receives its channels (loading a state_dict too: it sets the units, and they flush).

    Cost of a rebuild (it runs on every subnet switch): a side whose units' ``selection_key`` did not change is
    skipped; index pieces the units hold on the host (prefix units build theirs there from a Python int) and the
    ranges no unit covers are assembled on the host and reach the device in one pinned, non-blocking copy for all
    sides together; pieces already on the device (importance units rank there) are only concatenated there. No
    step waits for the device.
    """

    def __init__(self, units: Sequence):
        self.units = list(units)
        self._ranges: Dict[SideKey, List[_Range]] = {}
        # keyed by the unit itself (identity hash), not id(): a deep copy or unpickled model maps it to its copy
        self._sides_of_unit: Dict[object, List[SideKey]] = {}
        self._modules: Dict[str, nn.Module] = {}
        self._sizes: Dict[SideKey, int] = {}
        self._sides: Dict[SideKey, _Side] = {}
        self._dirty: Dict[SideKey, None] = {}
        self._defer_depth = 0

    def attach(self, model: nn.Module) -> "LayerIndexAssembler":
        """Resolve the units' modules in ``model``, register with the units and apply every selection."""
        self.check(model)
        for unit in self.units:
            unit._assembler = self
        self._sides = {key: _Side(self._modules[key[0]], self._sizes[key], ranges, key[1])
                       for key, ranges in self._ranges.items()}
        self._dirty = dict.fromkeys(self._ranges)
        self.flush()
        return self

    def check(self, model: nn.Module) -> None:
        """Resolve the modules and check the ranges (no overlaps, within each layer); ConfigError otherwise.

        Works on plain layers too, so a caller can validate before converting anything.
        """
        self._modules, self._ranges, self._sides_of_unit, self._sizes = {}, {}, {}, {}
        for unit in self.units:
            for ref in unit.related_refs:
                if ref.name not in self._modules:
                    self._modules[ref.name] = get_layer(model, ref, f"unit {unit.name}")
                module = self._modules[ref.name]
                key = (ref.name, True if has_one_selection(module) else bool(ref.is_output_channel))
                self._add_range(key, _Range(ref.start, ref.end, ref.expand, unit), unit)
        for key, ranges in self._ranges.items():
            ranges.sort(key=lambda r: r.start)
            self._check_ranges(key, ranges)

    def _add_range(self, key: SideKey, new: _Range, unit) -> None:
        ranges = self._ranges.setdefault(key, [])
        # A norm (or a depthwise conv listed on both sides) may name the same range twice for one unit.
        if any(r.unit is unit and r.start == new.start and r.end == new.end for r in ranges):
            return
        ranges.append(new)
        self._sides_of_unit.setdefault(unit, []).append(key)

    def _check_ranges(self, key: SideKey, ranges: List[_Range]) -> None:
        name, is_output = key
        size = module_channel_count(self._modules[name], is_output, name)
        self._sizes[key] = size
        previous_end = 0
        for r in ranges:
            if r.start < previous_end or r.end > size or r.start < 0:
                side = "output" if is_output else "input"
                raise ConfigError(f"{name}: {side} channel range [{r.start}, {r.end}) of unit {r.unit.name} "
                                  f"overlaps another unit or exceeds the layer's {size} channels")
            previous_end = r.end

    # ------------------------------------------------------------------------------------------------ updating
    def unit_changed(self, unit) -> None:
        for key in self._sides_of_unit.get(unit, ()):
            self._dirty[key] = None
        if self._defer_depth == 0:
            self.flush()

    @contextlib.contextmanager
    def deferred(self):
        """Collect unit changes and rebuild each touched layer side once, when the block ends."""
        self._defer_depth += 1
        try:
            yield self
        finally:
            self._defer_depth -= 1
            if self._defer_depth == 0:
                self.flush()

    def flush(self) -> None:
        """Give every side touched since the last flush its index: build all on the host / device, move the host
        pieces in one copy per device, then set them (in that order, so no layer sees a half-made index)."""
        dirty, self._dirty = self._dirty, {}
        transfer, staged = _HostToDevice(), []
        for key in dirty:
            side = self._sides[key]
            keys = side.selection_keys()
            if side.unchanged(keys):
                continue  # e.g. a unit set to another width and back inside one deferred block
            staged.append((side, keys, self._pieces(side, transfer)))
        if not staged:
            return
        transfer.copy()
        for side, keys, pieces in staged:
            if pieces is None:
                index = None
            else:
                parts = [transfer.resolve(piece) for piece in pieces]
                index = torch.cat(parts) if len(parts) > 1 else parts[0]
            side.set_index(index, keys)

    def layer_index(self, key: SideKey) -> Optional[Tensor]:
        """Global sorted int64 index of a layer side's kept channels (on the layer's device), or None when all
        are kept. Builds it afresh; what :meth:`flush` sets is equal."""
        transfer = _HostToDevice()
        pieces = self._pieces(self._sides[key], transfer)
        if pieces is None:
            return None
        transfer.copy()
        parts = [transfer.resolve(piece) for piece in pieces]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _pieces(self, side: _Side, transfer: _HostToDevice) -> Optional[List[Piece]]:
        """The side's index in channel order as pieces: device tensors, or tickets for host-built pieces that
        ``transfer`` will move; None when every channel is kept."""
        if side.kept() == side.size:
            return None
        device = _device_of(side.module)
        if side.whole:
            return [transfer.add(side.ranges[0].unit.selected_index, device)]
        pieces, host, position = [], [], 0
        for r in side.ranges:
            if r.start > position:
                host.append(torch.arange(position, r.start))
            index = r.unit.selected_index
            if index is None:
                index = torch.arange(r.start, r.end)
            else:
                index = _expanded(index, r.expand)
                if r.start:
                    index = index + r.start
            if index.device.type == "cpu":
                host.append(index)
            else:  # a device piece: whatever the host pieces before it are, they go as one
                if host:
                    pieces.append(transfer.add(_joined(host), device))
                    host = []
                pieces.append(index if index.device == device else index.to(device))
            position = r.end
        if position < side.size:
            host.append(torch.arange(position, side.size))
        if host:
            pieces.append(transfer.add(_joined(host), device))
        return pieces


def _joined(pieces: List[Tensor]) -> Tensor:
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _device_of(module) -> torch.device:
    """The device a layer's index must live on (own parameters / buffers first: cheaper than module_device)."""
    if isinstance(module, ops.ChannelParameter):
        return module.device
    for tensor in module._parameters.values():
        if tensor is not None:
            return tensor.device
    for tensor in module._buffers.values():
        if tensor is not None:
            return tensor.device
    return module_device(module)


def _expanded(index: Tensor, expand: int) -> Tensor:
    """Unit channel ``c`` -> layer channels ``c * expand ... c * expand + expand - 1``."""
    if expand == 1:
        return index
    return (index.unsqueeze(1) * expand + torch.arange(expand, device=index.device)).reshape(-1)
