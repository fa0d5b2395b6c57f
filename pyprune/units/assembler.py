"""LayerIndexAssembler: turns unit selections into each layer's global in / out channel index."""
import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .modules import get_layer, has_one_selection, module_channel_count

# (module name, is_output); norms and channel tensors use "out" for both sides since they have one channel dim.
SideKey = Tuple[str, bool]


class _Range:
    __slots__ = ("start", "end", "expand", "unit")

    def __init__(self, start: int, end: int, expand: int, unit):
        self.start, self.end, self.expand, self.unit = start, end, expand, unit


class LayerIndexAssembler:
    """Builds and applies every layer side's channel index from the units that cover it.

    For a layer side (a module's input or output channels) covered by the ranges ``[start, end)`` of some units,
    the global index is the concatenation, in channel order, of each unit's index expanded by ``expand`` and
    offset by ``start``; channels no unit covers are kept. When every channel is kept the index is ``None``.
    Units report changes through :meth:`unit_changed`; only the layer sides they cover are rebuilt, and within
    :meth:`deferred` the rebuild waits until the block ends (a concat consumer is rebuilt once, not per unit).
    Indices go to the DynamicOps through the trusted ``set_out_index`` / ``set_in_index``.
    """

    def __init__(self, units: Sequence):
        self.units = list(units)
        self._ranges: Dict[SideKey, List[_Range]] = {}
        self._sides_of_unit: Dict[int, List[SideKey]] = {}
        self._modules: Dict[str, nn.Module] = {}
        self._sizes: Dict[SideKey, int] = {}
        self._dirty: Dict[SideKey, None] = {}
        self._defer_depth = 0

    def attach(self, model: nn.Module) -> "LayerIndexAssembler":
        """Resolve the units' modules in ``model``, register with the units and apply every selection."""
        self.check(model)
        for unit in self.units:
            unit._assembler = self
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
        self._sides_of_unit.setdefault(id(unit), []).append(key)

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
        for key in self._sides_of_unit.get(id(unit), ()):
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
        dirty, self._dirty = list(self._dirty), {}
        for key in dirty:
            name, is_output = key
            index = self.layer_index(key)
            module = self._modules[name]
            if is_output or has_one_selection(module):
                module.set_out_index(index)
            else:
                module.set_in_index(index)

    def layer_index(self, key: SideKey) -> Optional[Tensor]:
        """Global sorted int64 index of a layer side's kept channels, or None when all are kept."""
        ranges, size = self._ranges[key], self._sizes[key]
        kept = size - sum(r.end - r.start for r in ranges)
        kept += sum(r.unit.active_channels * r.expand for r in ranges)
        if kept == size:
            return None
        device = ranges[0].unit.device
        pieces, position = [], 0
        for r in ranges:
            if r.start > position:
                pieces.append(torch.arange(position, r.start, device=device))
            pieces.append(_expanded(r.unit.current_index, r.expand) + r.start)
            position = r.end
        if position < size:
            pieces.append(torch.arange(position, size, device=device))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _expanded(index: Tensor, expand: int) -> Tensor:
    """Unit channel ``c`` -> layer channels ``c * expand ... c * expand + expand - 1``."""
    if expand == 1:
        return index
    return (index.unsqueeze(1) * expand + torch.arange(expand, device=index.device)).reshape(-1)
