"""Channel spaces (which group's channels a tensor dim holds) and the union-find table of channel groups.

A group can be *partitioned* (:meth:`GroupTable.refine`): its channels become pieces, each a new group whose
channel ("slot") stands for ``block`` consecutive channels of the parent. That is how a channel dim reshaped into
``(heads, head_dim)`` becomes a group of heads: the heads group has one slot per head, each covering ``head_dim``
channels, so a selection of it keeps whole heads; a fused ``(3, heads, head_dim)`` projection becomes three pieces
(q, k and v heads) that the attention then couples. Refs, fix reasons, group constraints and later unions of the
parent are translated to its pieces, and segments that still name the parent are read through them
(:meth:`GroupTable.resolve`).
"""
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


@dataclass(frozen=True)
class PartedSpace:
    """A tensor whose dim ``dim`` indexes parts, each holding its own channel space on the other dims: a fused
    ``qkv(x).reshape(B, N, 3, heads, head_dim)`` holds the q, k and v heads on dim 3 and picks one of them on dim 2.

    The part spaces use the full tensor's dims (``parts[i].ndim == ndim``). Only ops that move dims or pick parts
    (permute, unbind, indexing the parts dim) know this value; every other op reading it fixes the parts' groups.
    """
    dim: int
    ndim: int
    parts: Tuple[ChannelSpace, ...]

    def part(self, index: int) -> ChannelSpace:
        """Part ``index`` as a tensor of its own (the parts dim dropped)."""
        space = self.parts[index]
        return space.with_dim(space.dim - (space.dim > self.dim), self.ndim - 1)


@dataclass(frozen=True)
class Piece:
    """Channels ``[offset, offset + length)`` of a partitioned group are slots of group ``gid``, ``block`` channels
    per slot (so ``gid`` has ``length // block`` channels)."""
    offset: int
    length: int
    block: int
    gid: int


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
        self._pieces: Dict[int, Tuple[Piece, ...]] = {}  # partitioned root -> its pieces (see refine)

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
        if a in self._pieces or b in self._pieces:  # the same channels: the same pieces, joined piece by piece
            self._union_pieces(a, b, why)
            return
        self._parent[b] = a
        self._refs[a] += self._refs.pop(b)
        self._groups[a] = math.lcm(self._groups[a], self._groups.pop(b))
        self._reasons.setdefault(a, []).extend(self._reasons.pop(b, []))
        if not self._reasons[a]:
            del self._reasons[a]

    def fix(self, gid: int, reason: str) -> None:
        root = self.find(gid)
        if root in self._pieces:
            for piece in self._pieces[root]:
                self.fix(piece.gid, reason)
            return
        self._reasons.setdefault(root, []).append(reason)

    def is_fixed(self, gid: int) -> bool:
        """Whether the group is fixed (a partitioned one: whether any of its pieces is)."""
        root = self.find(gid)
        if root in self._pieces:
            return any(self.is_fixed(piece.gid) for piece in self._pieces[root])
        return root in self._reasons

    def constrain_groups(self, gid: int, groups: int) -> None:
        root = self.find(gid)
        if root in self._pieces:
            self._constrain_pieces(root, groups)
            return
        self._groups[root] = math.lcm(self._groups[root], groups)
        if self.size[root] % self._groups[root]:
            self.fix(root, f"{self.size[root]} channels do not split into {self._groups[root]} equal groups")

    def add_ref(self, gid: int, ref: ChannelRef) -> None:
        """``ref`` covers every channel of the group (``ref.width == size * ref.expand``)."""
        root = self.find(gid)
        if root in self._pieces:
            for piece in self._pieces[root]:
                self.add_ref(piece.gid, _piece_ref(ref, piece))
            return
        self._refs[root].append((self._added, ref))
        self._added += 1

    def ref_names(self, gid: int) -> set:
        """The names the refs of ``gid``'s group (every piece of a partitioned one) point at."""
        root = self.find(gid)
        if root in self._pieces:
            return set().union(*(self.ref_names(piece.gid) for piece in self._pieces[root]))
        return {ref.name for _, ref in self._refs[root]}

    # ---- partitioned groups --------------------------------------------------------------------------------------
    def is_partitioned(self, gid: int) -> bool:
        return self.find(gid) in self._pieces

    def refine(self, gid: int, start: int, end: int, block: int) -> Optional[Tuple[int, int, int]]:
        """Make channels ``[start, end)`` of group ``gid`` slots of ``block`` channels each; returns ``(group,
        first slot, end slot)`` holding them, or None where that cannot be (a cut or slot inside a coarser slot).

        A leaf group is partitioned into the pieces ``[0, start)``, ``[start, end)`` (``block`` per slot) and
        ``[end, size)`` (one channel per slot), each a new group that takes over the parent's refs (sliced), fix
        reasons and group constraint; a partitioned group refines the piece holding the range.
        """
        root, size = self.find(gid), self.size[self.find(gid)]
        if not (0 <= start < end <= size) or start % block or end % block:
            return None
        if root in self._pieces:
            for piece in self._pieces[root]:
                lo, hi = start - piece.offset, end - piece.offset
                if 0 <= lo and hi <= piece.length:
                    if lo % piece.block or hi % piece.block or block % piece.block:
                        return None
                    return self.refine(piece.gid, lo // piece.block, hi // piece.block, block // piece.block)
            return None  # the range spans several pieces
        if block == 1:
            return root, start, end
        layout = [(0, start, 1), (start, end - start, block), (end, size - end, 1)]
        pieces = self._partition(root, [(o, n, b) for o, n, b in layout if n])
        middle = next(p for p in pieces if p.offset == start)
        return middle.gid, 0, (end - start) // block

    def cut(self, gid: int, length: int) -> Optional[Tuple[int, ...]]:
        """Partition leaf group ``gid`` into consecutive pieces of ``length`` channels (``fc1(x).chunk(2)``); returns
        the pieces' groups, or None where the group is already partitioned or ``length`` does not divide it."""
        root = self.find(gid)
        size = self.size[root]
        if root in self._pieces or length <= 0 or size % length or size == length:
            return None
        return tuple(p.gid for p in self._partition(root, [(o, length, 1) for o in range(0, size, length)]))

    def _partition(self, root: int, layout: Sequence[Tuple[int, int, int]]) -> Tuple[Piece, ...]:
        """Split leaf ``root`` into pieces ``(offset, length, block)`` covering it in order."""
        pieces = tuple(Piece(o, n, b, self.new(n // b)) for o, n, b in layout)
        self._pieces[root] = pieces
        refs, reasons, groups = self._refs[root], self._reasons.pop(root, []), self._groups[root]
        self._refs[root], self._groups[root] = [], 1
        for piece in pieces:
            for order, ref in refs:  # keep each ref's place in the forward order
                self._refs[piece.gid].append((order, _piece_ref(ref, piece)))
            for reason in reasons:
                self.fix(piece.gid, reason)
        if groups > 1:
            self._constrain_pieces(root, groups)
        return pieces

    def _constrain_pieces(self, root: int, groups: int) -> None:
        """``groups`` equal blocks to keep balanced over a partitioned group: one piece whose slots split into
        those blocks carries the constraint; anything else fixes the pieces."""
        pieces = self._pieces[root]
        if groups == 1:
            return
        if len(pieces) == 1 and (self.size[root] // groups) % pieces[0].block == 0:
            self.constrain_groups(pieces[0].gid, groups)
            return
        self.fix(root, f"{groups} equal channel groups cannot be kept balanced over channels split into heads")

    def _union_pieces(self, a: int, b: int, why: str) -> None:
        """Join two groups of the same size at least one of which is partitioned: a leaf is partitioned like the
        other, then the pieces are joined one by one; two different partitions fix both."""
        layout = [(p.offset, p.length, p.block) for p in self._pieces.get(a, self._pieces.get(b))]
        for root in (a, b):
            if root not in self._pieces:
                self._partition(root, layout)
        if [(p.offset, p.length, p.block) for p in self._pieces[a]] != \
                [(p.offset, p.length, p.block) for p in self._pieces[b]]:
            self.fix(a, why)
            self.fix(b, why)
            return
        for pa, pb in zip(self._pieces[a], self._pieces[b]):
            self.union(pa.gid, pb.gid, why)

    def resolve(self, seg: Segment) -> Optional[Tuple[Segment, ...]]:
        """``seg`` in terms of groups that are not partitioned (the leaves), or None where a cut of ``seg`` falls
        inside a slot of a piece."""
        root = self.find(seg.gid)
        if root not in self._pieces:
            return (seg,)
        out: List[Segment] = []
        for piece in self._pieces[root]:
            lo, hi = max(seg.start, piece.offset), min(seg.end, piece.offset + piece.length)
            if lo >= hi:
                continue
            if (lo - piece.offset) % piece.block or (hi - piece.offset) % piece.block:
                return None
            inner = self.resolve(Segment(piece.gid, (lo - piece.offset) // piece.block,
                                         (hi - piece.offset) // piece.block, seg.expand * piece.block))
            if inner is None:
                return None
            out += inner
        return tuple(out)

    def resolve_space(self, space: ChannelSpace) -> ChannelSpace:
        """``space`` with every segment read through the partitions (a segment that cannot be is kept as it is:
        it names a partitioned group, which fixes all its pieces wherever it is used)."""
        if not self._pieces:
            return space
        segments: List[Segment] = []
        for seg in space.segments:
            resolved = self.resolve(seg)
            segments += [seg] if resolved is None else resolved
        return ChannelSpace(space.dim, space.ndim, merge_adjacent(segments))

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

    def _fix_overlaps(self) -> None:
        """Two groups covering overlapping ranges of one layer side (an int attribute spelling the width of the
        residual stream in one reshape and of the heads in another, ViT-style ``reshape(B, N, C)``) cannot both
        set it: fix them all."""
        ranges: Dict[Tuple[str, bool], List[Tuple[int, int, int, int]]] = {}
        for gid in range(len(self._parent)):
            for _, ref in self._refs.get(gid, ()):
                key = (ref.name, ref.is_output_channel)
                ranges.setdefault(key, []).append((ref.start, ref.end, ref.expand, self.find(gid)))
        for (name, _), found in ranges.items():
            found = sorted(set(found))
            clash = any(a[0] < b[1] and b[0] < a[1] and a != b for i, a in enumerate(found) for b in found[i + 1:])
            if clash:
                for *_, root in found:
                    self.fix(root, f"{name} is covered by two channel groups in different ways")

    def specs(self) -> List[UnitSpec]:
        """One UnitSpec per group that touches at least one module, in order of first appearance; each group's
        refs in the order the forward met them (so a unit is named after its first layer, as mmrazor names it)."""
        self._join_reused_layers()
        self._fix_overlaps()
        out = []
        for gid in range(len(self._parent)):
            if self.find(gid) != gid or gid in self._pieces or not self._refs[gid]:
                continue
            refs = list(dict.fromkeys((r.name, r.start, r.end, r.is_output_channel, r.expand, r.param_dim,
                                       r.read_by)
                                      for _, r in sorted(self._refs[gid], key=lambda entry: entry[0])))
            refs = [ChannelRef(*r) for r in refs]
            reasons = list(dict.fromkeys(self._reasons.get(gid, [])))
            out.append(UnitSpec(num_channels=self.size[gid],
                                output_related=[r for r in refs if r.is_output_channel],
                                input_related=[r for r in refs if not r.is_output_channel],
                                groups=self._groups[gid], fixed=bool(reasons), reason="; ".join(reasons)))
        return out


def _piece_ref(ref: ChannelRef, piece: Piece) -> ChannelRef:
    """The part of ``ref`` (covering a whole group) that covers ``piece`` of it, one slot per ``piece.block``
    channels."""
    return ChannelRef(ref.name, ref.start + piece.offset * ref.expand,
                      ref.start + (piece.offset + piece.length) * ref.expand, ref.is_output_channel,
                      ref.expand * piece.block, ref.param_dim, ref.read_by)
