"""What one DynamicOp holds while it trains in compact mode: its channel tensors *are* the compact ones.

In compact training mode (:mod:`pyprune.ops.compact`) each pruned channel tensor of a DynamicOp (a parameter or a
running-stat buffer) keeps its object identity but its ``.data`` is swapped for the compact copy; the full-size data
is set aside, untouched, in a :class:`HeldTensor`. The op's forward then uses the tensors as they are (no gather) and
their gradients are compact (no scatter). Releasing writes the compact values back into the full data in place
(``index_copy_`` / ``scatter_``: no host sync) and swaps the full data back in.

Where a compact tensor comes from is a :class:`ChannelSlice`, which every DynamicOp describes for its own tensors
(``DynamicChannelMixin._compact_layout``); the gather here is the one ``_gather_compact`` does, and the write-back
is its exact inverse.
"""
from typing import Dict, List, NamedTuple, Optional

import torch
from torch import Tensor

from .. import kernels

__all__ = ["ChannelSlice", "HeldTensor", "CompactOpState", "gather_slice", "scatter_slice_"]


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
    loading). ``suspended``: set by the session while paused, so a selection change leaves the op full-size.
    The session moves optimizer state along and tracks which parameters are compact (the ops keep it alive, so a
    session nobody else holds still works); a deep copy or a pickle of the op drops it (a copy made in compact mode
    stays compact, on its own, with no optimizer).
    """

    def __init__(self, session=None):
        self.session = session
        self.held: List[HeldTensor] = []
        self.tensors: tuple = ()  # the op's _source_tensors() while held: what its forward uses, as they are
        self.tensors_of = None    # the op they belong to (a DataParallel replica shares this state, not them)
        self.suspended = False
        self.loading = False

    def __getstate__(self):
        return {"session": None, "held": self.held, "tensors": self.tensors, "tensors_of": self.tensors_of,
                "suspended": False, "loading": False}

    def held_tensors(self, op) -> Optional[tuple]:
        """The op's channel tensors as they are (they are the compact ones) while held, else None."""
        if not self.held:
            return None
        return self.tensors if self.tensors_of is op else tuple(op._source_tensors())

    # --------------------------------------------------------------------------------------------------- moves
    def compact(self, op, with_optimizer: bool = True) -> None:
        """Swap every pruned channel tensor of ``op`` (and its gradient, and with ``with_optimizer`` the optimizer
        state shaped like it) for its compact copy; the full data is set aside. No-op when already compact."""
        if self.held:
            return
        layout = op._compact_layout()
        session = self.session
        if session is not None and with_optimizer:
            session._check_optimizer_states(op, layout)  # refuse before anything changes
        with torch.no_grad():
            for piece in layout:
                tensor = piece.tensor
                full = tensor.data
                grad = tensor.grad
                compact_grad = None if grad is None else gather_slice(piece, grad)
                if session is not None and with_optimizer:
                    session._compact_optimizer_state(piece, full.shape)
                tensor.data = gather_slice(piece, full)
                if grad is not None:
                    tensor.grad = compact_grad
                self.held.append(HeldTensor(piece, full))
        self.tensors, self.tensors_of = tuple(op._source_tensors()), op
        op.clear_cache()
        if session is not None:
            session._held_changed(op, self.held)

    def release(self, op, with_optimizer: bool = True) -> None:
        """Write the compact values back into the full data and swap it back in (gradients scattered into zero
        full-size ones, optimizer state written back likewise). No-op when nothing is held."""
        if not self.held:
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
        released, self.held, self.tensors, self.tensors_of = self.held, [], (), None
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
        """``{tensor path relative to the op: full data with the current values written back}`` (in place)."""
        with torch.no_grad():
            return {held.name: held.written_back() for held in self.held}
