"""Channel spaces (which group's channels a tensor dim holds) and the union-find table of channel groups."""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .spec import ChannelRef, UnitSpec


@dataclass(frozen=True)
class Segment:
    """Channels ``[start, end)`` of group ``gid``; each of them spans ``expand`` consecutive tensor positions."""
    gid: int
    start: int
    end: int
    expand: int = 1

    @property
    def width(self) -> int:
        return (self.end - self.start) * self.expand


@dataclass(frozen=True)
class ChannelSpace:
    """The channel layout of one tensor: dim ``dim`` (of ``ndim``) is the concatenation of ``segments``."""
    dim: int
    ndim: int
    segments: Tuple[Segment, ...]

    @property
    def width(self) -> int:
        return sum(s.width for s in self.segments)

    def with_dim(self, dim: int, ndim: int) -> "ChannelSpace":
        return ChannelSpace(dim, ndim, self.segments)

    def expanded(self, factor: int) -> "ChannelSpace":
        """Each channel now spans ``factor`` times as many positions (flatten of the trailing dims)."""
        return ChannelSpace(self.dim, self.ndim, tuple(Segment(s.gid, s.start, s.end, s.expand * factor)
                                                       for s in self.segments))


def merge_adjacent(segments: Sequence[Segment]) -> Tuple[Segment, ...]:
    """Join neighbours that continue the same group (a chunk concatenated back in order is whole again)."""
    out: List[Segment] = []
    for seg in segments:
        if out and out[-1].gid == seg.gid and out[-1].end == seg.start and out[-1].expand == seg.expand:
            out[-1] = Segment(seg.gid, out[-1].start, seg.end, seg.expand)
        else:
            out.append(seg)
    return tuple(out)


def slice_space(space: ChannelSpace, lo: int, hi: int) -> Optional[Tuple[Segment, ...]]:
    """Segments covering tensor positions ``[lo, hi)`` of the channel dim; None if a cut falls inside an expand."""
    out, offset = [], 0
    for seg in space.segments:
        a, b = max(lo, offset), min(hi, offset + seg.width)
        if a < b:
            if (a - offset) % seg.expand or (b - offset) % seg.expand:
                return None
            out.append(Segment(seg.gid, seg.start + (a - offset) // seg.expand,
                               seg.start + (b - offset) // seg.expand, seg.expand))
        offset += seg.width
    return tuple(out)


class GroupTable:
    """Union-find over channel groups, with the module ranges, constraints and fix reasons of each group."""

    def __init__(self):
        self._parent: List[int] = []
        self.size: List[int] = []
        self._reasons: Dict[int, List[str]] = {}
        self._groups: Dict[int, int] = {}
        self._refs: Dict[int, List[Tuple[int, ChannelRef]]] = {}  # (order added, ref): forward order survives unions
        self._added = 0

    def new(self, size: int, fixed_reason: str = "") -> int:
        gid = len(self._parent)
        self._parent.append(gid)
        self.size.append(size)
        self._refs[gid] = []
        self._groups[gid] = 1
        if fixed_reason:
            self._reasons[gid] = [fixed_reason]
        return gid

    def find(self, gid: int) -> int:
        while self._parent[gid] != gid:
            self._parent[gid] = self._parent[self._parent[gid]]
            gid = self._parent[gid]
        return gid

    def union(self, a: int, b: int, why: str) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] != self.size[b]:
            self.fix(a, why)
            self.fix(b, why)
            return
        self._parent[b] = a
        self._refs[a] += self._refs.pop(b)
        self._groups[a] = math.lcm(self._groups[a], self._groups.pop(b))
        self._reasons.setdefault(a, []).extend(self._reasons.pop(b, []))
        if not self._reasons[a]:
            del self._reasons[a]

    def fix(self, gid: int, reason: str) -> None:
        self._reasons.setdefault(self.find(gid), []).append(reason)

    def is_fixed(self, gid: int) -> bool:
        return self.find(gid) in self._reasons

    def constrain_groups(self, gid: int, groups: int) -> None:
        root = self.find(gid)
        self._groups[root] = math.lcm(self._groups[root], groups)
        if self.size[root] % self._groups[root]:
            self.fix(root, f"{self.size[root]} channels do not split into {self._groups[root]} equal groups")

    def add_ref(self, gid: int, ref: ChannelRef) -> None:
        self._refs[self.find(gid)].append((self._added, ref))
        self._added += 1

    def _join_reused_layers(self) -> None:
        """A layer applied to several inputs (one module called more than once) meets the same range of its
        channels in the group of every call; its weights are shared, so those groups are one (as in mmrazor)."""
        first: Dict[Tuple, int] = {}
        for gid in range(len(self._parent)):
            for _, ref in list(self._refs.get(gid, ())):
                key = (ref.name, ref.start, ref.end, ref.is_output_channel, ref.expand, ref.param_dim)
                if key in first:
                    self.union(first[key], gid, f"{ref.name} is applied to inputs of different widths")
                else:
                    first[key] = gid

    def specs(self) -> List[UnitSpec]:
        """One UnitSpec per group that touches at least one module, in order of first appearance; each group's
        refs in the order the forward met them (so a unit is named after its first layer, as mmrazor names it)."""
        self._join_reused_layers()
        out = []
        for gid in range(len(self._parent)):
            if self.find(gid) != gid or not self._refs[gid]:
                continue
            refs = list(dict.fromkeys((r.name, r.start, r.end, r.is_output_channel, r.expand, r.param_dim)
                                      for _, r in sorted(self._refs[gid], key=lambda entry: entry[0])))
            refs = [ChannelRef(*r) for r in refs]
            reasons = list(dict.fromkeys(self._reasons.get(gid, [])))
            out.append(UnitSpec(num_channels=self.size[gid],
                                output_related=[r for r in refs if r.is_output_channel],
                                input_related=[r for r in refs if not r.is_output_channel],
                                groups=self._groups[gid], fixed=bool(reasons), reason="; ".join(reasons)))
        return out
