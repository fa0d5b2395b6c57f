"""What one DynamicOp holds while it trains in compact mode: its channel tensors *are* the compact ones.

In compact training mode (:mod:`pyprune.ops.compact`) each pruned channel tensor of a DynamicOp (a parameter or a
running-stat buffer) keeps its object identity but its ``.data`` is swapped for the compact copy; the full-size data
is set aside, untouched, in a :class:`HeldTensor`. The op's forward then uses the tensors as they are (no gather) and
their gradients are compact (no scatter). Releasing writes the compact values back into the full data in place
(``index_copy_`` / ``scatter_``: no host sync) and swaps the full data back in.

Where a compact tensor comes from is a :class:`ChannelSlice`, which every DynamicOp describes for its own tensors
(``DynamicChannelMixin._compact_layout``); the gather here is the one ``_gather_compact`` does, and the write-back
is its exact inverse.

Ops that share a tensor (tied input / output embeddings: ``embed_tokens.weight is lm_head.weight``) are *peers*:
they compact together, and only when every one of them keeps the same channels of every tensor they share (the
tracer makes tied tensors one selection, so a traced model's always do). The first holds the shared tensor (its
:class:`HeldTensor`, its optimizer state), the others borrow it; releasing any of them releases them all. Peers
that disagree (while a selection change reaches them one by one, or for good) all stay full-size and gather.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .. import kernels

__all__ = ["ChannelSlice", "HeldTensor", "CompactOpState", "gather_slice", "scatter_slice_", "same_slice",
           "agree_on_shared", "state_of", "full_shape_of"]


class ChannelSlice(NamedTuple):
    """One pruned channel tensor of an op and the channels its compact copy keeps.

    ``dim == 0``: the compact copy is ``kernels.gather_channels(tensor, rows, cols)`` (rows = kept output channels
    ``[K_out]`` or None, cols = kept input channels ``[K_in]``, per-group local ``[G, K_in / G]`` or None; cols only
    for tensors of rank > 1). ``dim > 0``: ``tensor.index_select(dim, rows)`` (e.g. attention's ``bias_k``
    ``[1, 1, E]``, ``dim=2``). ``name`` is the tensor's path relative to the op (``"weight"``, ``"out_proj.bias"``).
    ``tensor`` is None in the provider's per-selection cache, which keeps the channels only (the op's current
    tensor is read at use: a parameter replaced meanwhile is not kept alive by the cache).
    """
    name: str
    tensor: Optional[Tensor]
    rows: Optional[Tensor]
    cols: Optional[Tensor] = None
    dim: int = 0


def same_slice(a: Optional[ChannelSlice], b: Optional[ChannelSlice]) -> bool:
    """Whether two slices keep the same channels (None: the tensor kept whole). The indices are compared by
    value only when they are not the same tensor (``torch.equal`` syncs a GPU)."""
    if a is None or b is None:
        return a is None and b is None
    return a.dim == b.dim and _same_index(a.rows, b.rows) and _same_index(a.cols, b.cols)


def _same_index(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def gather_slice(piece: ChannelSlice, source: Tensor, dtype: Optional[torch.dtype] = None,
                 memory_format: Optional[torch.memory_format] = None) -> Tensor:
    """The compact copy of ``source`` (shaped like ``piece.tensor``'s full data: the data itself, its gradient or an
    optimizer state tensor); a new tensor, differentiable w.r.t. ``source``. ``dtype`` / ``memory_format``: write
    it in that dtype / layout (the kernel's converting form: one pass)."""
    if piece.dim:
        compact = source.index_select(piece.dim, piece.rows)
        return compact if dtype is None else compact.to(dtype)
    if dtype is None and memory_format is None:
        return kernels.gather_channels(source, piece.rows, piece.cols)  # the plain form: no keyword handling
    return kernels.gather_channels(source, piece.rows, piece.cols, dtype=dtype, memory_format=memory_format)


def scatter_slice_(full: Tensor, compact: Tensor, piece: ChannelSlice) -> None:
    """In place: write ``compact`` into the kept places of ``full`` (the inverse of :func:`gather_slice`); the other
    entries are untouched. Index ops only, so no host-device sync."""
    if piece.dim:
        full.index_copy_(piece.dim, piece.rows, compact)
        return
    rows, cols = piece.rows, piece.cols
    if cols is None:
        full.index_copy_(0, rows, compact)
        return
    block = full if rows is None else full.index_select(0, rows)
    if cols.dim() == 1:
        block.index_copy_(1, cols, compact)
    else:
        _scatter_per_group_(block, cols, compact)
    if rows is not None:
        full.index_copy_(0, rows, block)


def _scatter_per_group_(block: Tensor, cols: Tensor, compact: Tensor) -> None:
    """``block`` ``[R, C_g, *rest]`` (rows split evenly in G groups), ``cols`` ``[G, k]`` local column indices,
    ``compact`` ``[R, k, *rest]``: row r of group g gets ``compact[r]`` at columns ``cols[g]``."""
    groups, kept = cols.shape
    rest = block.shape[2:]
    target = block if block.is_contiguous() else block.contiguous()
    view = target.view(groups, block.shape[0] // groups, block.shape[1], *rest)
    index = cols.view(groups, 1, kept, *([1] * len(rest))).expand(groups, view.shape[1], kept, *rest)
    view.scatter_(2, index, compact.reshape(groups, view.shape[1], kept, *rest))
    if target is not block:
        block.copy_(target)


class HeldTensor:
    """A tensor in compact form: ``piece.tensor.data`` is compact, ``full`` is its full-size data set aside."""

    __slots__ = ("piece", "full")

    def __init__(self, piece: ChannelSlice, full: Tensor):
        self.piece, self.full = piece, full

    @property
    def name(self) -> str:
        return self.piece.name

    def written_back(self) -> Tensor:
        """``full`` with the current compact values written into it (in place) and returned."""
        scatter_slice_(self.full, self.piece.tensor.data, self.piece)
        return self.full

    def __getstate__(self):
        return {"piece": self.piece, "full": self.full}

    def __setstate__(self, state):
        self.piece, self.full = state["piece"], state["full"]


class CompactOpState:
    """The compact-mode state of one DynamicOp: the source installed in its tensor provider
    (:class:`~pyprune.ops.provider.TensorProvider`) while a compact training session is on.

    ``held``: the op's tensors in compact form (empty when its selection keeps every channel, or while paused /
    loading). ``borrowed``: tensors it shares with a peer that holds them (see the module docstring); ``peers``:
    the other ops it shares tensors with. ``suspended``: set by the session while paused, so a selection change
    leaves the op full-size. The session moves optimizer state along and tracks which parameters are compact (the
    ops keep it alive, so a session nobody else holds still works); a deep copy or a pickle of the op drops it (a
    copy made in compact mode stays compact, on its own, with no optimizer).
    """

    def __init__(self, session=None, peers: Sequence = ()):
        self.session = session
        self.peers = list(peers)
        self.held: List[HeldTensor] = []
        self.borrowed: Dict[str, HeldTensor] = {}  # {tensor path relative to the op: the peer's HeldTensor}
        self.tensors: tuple = ()  # the op's _source_tensors() while held: what its forward uses, as they are
        self.tensors_of = None    # the op they belong to (a DataParallel replica shares this state, not them)
        self.suspended = False
        self.loading = False

    def __getstate__(self):
        return {"session": None, "peers": self.peers, "held": self.held, "borrowed": self.borrowed,
                "tensors": self.tensors, "tensors_of": self.tensors_of, "suspended": False, "loading": False}

    def held_tensors(self, op) -> Optional[tuple]:
        """The op's channel tensors as they are (they are the compact ones) while held, else None."""
        if not (self.held or self.borrowed):
            return None
        return self.tensors if self.tensors_of is op else tuple(op._source_tensors())

    def _group(self, op) -> list:
        """``[(op, state)]`` of ``op`` and its peers (that are still in compact mode)."""
        group = [(op, self)]
        for peer in self.peers:
            state = state_of(peer)
            if state is not None:
                group.append((peer, state))
        return group

    # --------------------------------------------------------------------------------------------------- moves
    def compact(self, op, with_optimizer: bool = True) -> None:
        """Swap every pruned channel tensor of ``op`` (and its gradient, and with ``with_optimizer`` the optimizer
        state shaped like it) for its compact copy; the full data is set aside. No-op when already compact. With
        peers, all of them together, once none is paused or loading and all keep the same channels of what they
        share (else all stay full-size)."""
        if self.held or self.borrowed:
            return
        if not self.peers:
            self._compact_members([(op, self)], [op._compact_layout()], with_optimizer)
            return
        group = self._group(op)
        if any(state.held or state.borrowed or state.suspended or state.loading for _, state in group):
            return
        layouts = [member._compact_layout() for member, _ in group]
        if agree_on_shared(group, layouts):
            self._compact_members(group, layouts, with_optimizer)

    def _compact_members(self, group: list, layouts: list, with_optimizer: bool) -> None:
        """Compact each ``(op, state)`` of ``group`` at its layout; a tensor already compacted by an earlier member
        is borrowed, not gathered again."""
        session = self.session
        if session is not None and with_optimizer:
            for (member, _), layout in zip(group, layouts):
                session._check_optimizer_states(member, layout)  # refuse before anything changes
        taken: Dict[int, HeldTensor] = {}
        for (member, state), layout in zip(group, layouts):
            with torch.no_grad():
                for piece in layout:
                    tensor = piece.tensor
                    if id(tensor) in taken:
                        state.borrowed[piece.name] = taken[id(tensor)]
                        continue
                    full = tensor.data
                    grad = tensor.grad
                    compact_grad = None if grad is None else gather_slice(piece, grad)
                    if session is not None and with_optimizer:
                        session._compact_optimizer_state(piece, full.shape)
                    tensor.data = gather_slice(piece, full)
                    if grad is not None:
                        tensor.grad = compact_grad
                    taken[id(tensor)] = HeldTensor(piece, full)
                    state.held.append(taken[id(tensor)])
            state.tensors, state.tensors_of = tuple(member._source_tensors()), member
            member.clear_cache()
            if session is not None:
                session._held_changed(member, state.held)

    def release(self, op, with_optimizer: bool = True) -> None:
        """Write the compact values back into the full data and swap it back in (gradients scattered into zero
        full-size ones, optimizer state written back likewise), in ``op`` and its peers. No-op when nothing is
        held."""
        for member, state in self._group(op):
            state._release_own(member, with_optimizer)

    def _release_own(self, op, with_optimizer: bool) -> None:
        if not (self.held or self.borrowed):
            return
        session = self.session
        with torch.no_grad():
            for held in reversed(self.held):
                piece, tensor = held.piece, held.piece.tensor
                compact_shape = tensor.shape
                full = held.written_back()
                grad = tensor.grad
                full_grad = None
                if grad is not None:
                    full_grad = grad.new_zeros(full.shape)
                    scatter_slice_(full_grad, grad, piece)
                if session is not None and with_optimizer:
                    session._release_optimizer_state(piece, compact_shape, full.shape)
                tensor.data = full
                if grad is not None:
                    tensor.grad = full_grad
        released, self.held, self.borrowed, self.tensors, self.tensors_of = self.held, [], {}, (), None
        op.clear_cache()
        if session is not None:
            session._held_changed(op, [], released)

    def selection_changed(self, op) -> None:
        """Called by the op after its selection changed: write back what the old selection held and, unless
        paused or loading, hold the new selection's compact tensors."""
        self.release(op)
        if not (self.suspended or self.loading):
            self.compact(op)

    def full_tensors(self) -> Dict[str, Tensor]:
        """``{tensor path relative to the op: full data with the current values written back}`` (in place), for
        the tensors it holds and those it borrows."""
        with torch.no_grad():
            full = {held.name: held.written_back() for held in self.held}
            full.update((name, held.written_back()) for name, held in self.borrowed.items())
            return full


def state_of(module) -> Optional[CompactOpState]:
    """The compact-mode state installed in ``module``'s tensor provider, or None (not a DynamicOp, or not in
    compact mode)."""
    provider = module.__dict__.get("_provider")
    source = None if provider is None else provider.source
    return source if isinstance(source, CompactOpState) else None


def full_shape_of(module, name: str) -> torch.Size:
    """The full-size shape of ``module``'s parameter / buffer ``name`` (a top-level one), also while compact
    training mode holds its compact copy (which ``tensor.shape`` is then): what a channel count read from a tensor
    must use."""
    state = state_of(module)
    if state is not None:
        for held in state.held:
            if held.name == name:
                return held.full.shape
        if name in state.borrowed:
            return state.borrowed[name].full.shape
    tensors = module._parameters if name in module._parameters else module._buffers
    return tensors[name].shape


def agree_on_shared(group: list, layouts: list) -> bool:
    """Whether the ops of ``group`` (``[(op, state)]``) keep the same channels of every tensor two of them use
    (``layouts``: each op's ``_compact_layout()``; a tensor an op uses but does not slice is kept whole by it)."""
    users: Dict[int, list] = {}
    for (member, _), layout in zip(group, layouts):
        slices = {id(piece.tensor): piece for piece in layout}
        for tensor in {id(t): t for t in member._source_tensors() if t is not None}.values():
            users.setdefault(id(tensor), []).append(slices.get(id(tensor)))
    return all(same_slice(pieces[0], other) for pieces in users.values() for other in pieces[1:])
