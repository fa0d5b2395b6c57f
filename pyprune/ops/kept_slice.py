"""KeptSliceOptimizer: the machinery of optimizers whose backward and step touch only the active subnet's channels.

In gather mode (the default) a training step on a subnet gathers each pruned tensor's kept channels, and autograd
scatters their gradient back into a *full-size* zero tensor; the optimizer then updates every channel, kept or not.
When the subnet changes every step (slimmable / one-shot / DMCP-style sampling) that full-size traffic is most of
the overhead over the exported subnet, and compact training mode does not help (its enter + exit per subnet costs
about a training step).

A :class:`KeptSliceOptimizer` is a :class:`torch.optim.Optimizer` over ``model.parameters()`` that, while it is
attached, hands every DynamicOp of ``model`` its compact tensors for each training forward as *leaf* tensors
(taken without autograd: nothing is scattered in backward), so the backward computes gradients of the compact
tensors only. Its :meth:`step` hands the update rule of a subclass (:class:`~.kept_slice_sgd.KeptSliceSGD`,
:class:`~.kept_slice_adamw.KeptSliceAdamW`) each sliced parameter as a :class:`KeptSlot` - the compact gradient,
the kept values, and the kept places of any full-size state tensor - and writes what the rule updated back into the
kept places (``index_copy_``; no host sync). Everything else (parameters outside the DynamicOps, ops whose selection
keeps every channel, ops gathering into an autocast dtype / channels_last layout) gets a full ``.grad`` and is
handed to the rule as a plain parameter.

A slice that keeps a *leading block* of its tensor (a sequential unit's prefix, host-known indices only) costs no
copy where the block is contiguous in memory (rows of any tensor: batch norm's parameters and running statistics,
a conv's output channels when all its inputs are kept): the op is handed a view of the full tensor, and its
in-place running-statistics update lands in the full buffers directly. A strided block (rows and columns of a conv
weight) is handed as a block copy (``contiguous()``, about twice as fast as the index gather). Either way the rule
updates the block of the parameter and its state in place (views, nothing written back). Other kept slices are
gathered copies, updated and scattered back.

The sliced parameters' ``.grad`` stays None (their gradient lives on the compact leaves until :meth:`step` or
:meth:`zero_grad`); ``state_dict`` / ``load_state_dict`` are the plain optimizer's (full-size state tensors).
Several forwards before one step (gradient accumulation) reuse the same leaves, so their gradients add up; a
selection change between a forward and the step is refused (so slimmable training, which backpropagates several
widths before one step, needs a plain optimizer). One optimizer per model; :meth:`detach` removes the hooks (the ops
gather on their own again).
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .base import DynamicChannelMixin
from .compact_state import ChannelSlice, gather_slice, scatter_slice_

__all__ = ["KeptSliceOptimizer", "KeptSlot"]

Region = Tuple[Optional[int], Optional[int]]  # (kept leading rows or None for all, kept leading columns or None)


class _SlicedParameter:
    """One sliced parameter of one op's training forward: its slice, the compact leaf handed to the op, and the
    leading block it keeps (None: a general selection, the leaf is a gathered copy)."""

    __slots__ = ("param", "piece", "leaf", "region")

    def __init__(self, param: nn.Parameter, piece: ChannelSlice, leaf: Tensor, region: Optional[Region]):
        self.param, self.piece, self.leaf, self.region = param, piece, leaf, region


class _OpLeaves:
    """What one op's training forward was handed: its selection version, the tuple handed to its provider, and the
    sliced parameters."""

    __slots__ = ("version", "handed", "params")

    def __init__(self, version: int, handed: tuple, params: List[_SlicedParameter]):
        self.version, self.handed, self.params = version, handed, params


class KeptSlot:
    """One sliced parameter's kept places in one step, as an update rule sees them.

    ``grad``: the gradient of the compact copy ``[compact shape]``. ``value``: the kept values to update in place
    (a view of the parameter's leading block, or the compact copy of this step, written back by the optimizer).
    :meth:`kept` gives the same for a full-size state tensor of the parameter (momentum, Adam's moments)."""

    __slots__ = ("param", "piece", "grad", "value", "_region", "_written")

    def __init__(self, sliced: _SlicedParameter):
        self.param, self.piece, self.grad, self._region = sliced.param, sliced.piece, sliced.leaf.grad, sliced.region
        self._written: List[Tuple[Tensor, Tensor]] = []  # (full tensor, compact copy to scatter into it)
        if self._region is not None:
            self.value = _narrowed(sliced.param, self._region)
        else:
            self.value = sliced.leaf.detach()  # the kept values of the parameter, gathered this step (unchanged since)
            self._written.append((sliced.param, self.value))

    def kept(self, full: Tensor) -> Tensor:
        """The kept places of ``full`` (shaped like the parameter, or like its leading dims with size-1 trailing
        ones) to update in place: a view, or a compact copy written back by :meth:`write_back`."""
        if self._region is not None:
            return _narrowed(full, self._region)
        compact = gather_slice(self.piece, full)
        self._written.append((full, compact))
        return compact

    def write_back(self) -> None:
        """Scatter the updated compact copies into their full tensors (on the parameter itself: its version counter
        moves, which the eval cache keys on)."""
        for full, compact in self._written:
            scatter_slice_(full, compact, self.piece)


class KeptSliceOptimizer(torch.optim.Optimizer):
    """Base of the kept-slice optimizers (see the module docstring): subclasses implement :meth:`_update_group`."""

    def __init__(self, model: nn.Module, defaults: dict):
        super().__init__(model.parameters(), defaults)
        self.model = model
        self.ops: List[DynamicChannelMixin] = [m for m in model.modules() if isinstance(m, DynamicChannelMixin)]
        self._leaves: Dict[int, _OpLeaves] = {}  # id(op) -> this step's leaves
        self._handles = (model.register_forward_pre_hook(self._before_forward),
                         model.register_forward_hook(self._after_forward, always_call=True))

    # ---------------------------------------------------------------------------------------------------- hooks
    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return
        x = next((a for a in args if isinstance(a, Tensor)), None)
        prefixes: Dict[int, Optional[int]] = {}  # id(index) -> prefix length; ops share index tensors
        for op in self.ops:
            if not op.training or op._holds_compact() or (x is not None and op._gather_form(x) is not None):
                continue  # gathers on its own (autograd path, full .grad)
            entry = self._leaves.get(id(op))
            if entry is None:
                entry = self._gather_leaves(op, prefixes)
                if entry is None:
                    continue
                self._leaves[id(op)] = entry
            elif entry.version != op.selection_version:
                raise RuntimeError(f"{type(self).__name__}: the selection of {type(op).__name__} changed between a "
                                   f"forward and optimizer.step(); call step() or zero_grad() before changing the "
                                   f"subnet")
            op.tensor_provider.hand(entry.handed)

    def _gather_leaves(self, op: DynamicChannelMixin, prefixes: Dict[int, Optional[int]]) -> Optional[_OpLeaves]:
        """The compact tensors to hand ``op`` for this step, or None when it has nothing sliced on dims 0 / 1.
        ``prefixes``: the prefix lengths of the index tensors seen so far in this forward."""
        slices = op.tensor_provider.slices(op)  # the layout of this selection (the op's write-back reads it too)
        if not slices or any(piece.dim for piece in slices.values()):
            return None
        handed, params = [], []
        with torch.no_grad():
            for name, source in zip(op._channel_tensors, op._source_tensors()):
                piece = slices.get(name)
                if piece is None:
                    handed.append(source)
                    continue
                trained = isinstance(source, nn.Parameter) and source.requires_grad
                region = _prefix_region(piece, prefixes)
                # a parameter's block: a view of a detached alias (a leaf of its own); a buffer's: a view of the
                # buffer itself, which its in-place update then writes (the provider sees it needs no carrying back)
                if region is None:
                    compact = gather_slice(piece, source)
                else:
                    compact = _narrowed(source.detach() if trained else source, region)
                    if not compact.is_contiguous():
                        # a strided block would be copied by its consumer anyway; a block copy is about twice as
                        # fast as the index gather
                        compact = compact.contiguous()
                if trained:
                    compact.requires_grad_(True)
                    params.append(_SlicedParameter(source, piece, compact, region))
                handed.append(compact)  # running statistics: a view (written in place) or a copy the op carries back
        return _OpLeaves(op.selection_version, tuple(handed), params)

    def _after_forward(self, module: nn.Module, args: tuple, output) -> None:
        for op in self.ops:
            op.tensor_provider.drop_handed()

    def detach(self) -> None:
        """Remove the hooks: the model's ops gather on their own again (this optimizer then steps plain grads)."""
        for handle in self._handles:
            handle.remove()
        self._after_forward(self.model, (), None)
        self._leaves.clear()

    # ----------------------------------------------------------------------------------------------------- step
    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._leaves.clear()

    def compact_grads(self) -> List[Tuple[nn.Parameter, ChannelSlice, Optional[Tensor]]]:
        """``(parameter, slice, gradient of its compact copy or None)`` for this step's sliced parameters."""
        return [(s.param, s.piece, s.leaf.grad) for entry in self._leaves.values() for s in entry.params]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{type(self).__name__}: step(closure) is not supported (the closure's forward would "
                             f"hand new leaves)")
        sliced: Dict[int, _SlicedParameter] = {}
        for entry in self._leaves.values():
            for s in entry.params:
                if s.leaf.grad is not None:
                    if id(s.param) in sliced:
                        raise RuntimeError(f"{type(self).__name__}: parameter of shape {tuple(s.param.shape)} is "
                                           f"sliced by two ops in one step (shared tensors are not supported)")
                    sliced[id(s.param)] = s
        for group in self.param_groups:
            plain, slots = [], []
            for p in group["params"]:
                s = sliced.get(id(p))
                if s is not None:
                    slots.append(KeptSlot(s))
                elif p.grad is not None:
                    plain.append(p)
            self._update_group(group, plain, slots)
            for slot in slots:
                slot.write_back()
        self._leaves.clear()

    def _update_group(self, group: dict, plain: List[nn.Parameter], slots: List[KeptSlot]) -> None:
        """Apply the update rule of ``group``'s hyper-parameters: to ``plain`` parameters (full ``.grad``) and to
        each slot's kept values (its compact ``grad``; state tensors through :meth:`KeptSlot.kept`)."""
        raise NotImplementedError


def _prefix_length(index: Tensor, known: Dict[int, Optional[int]]) -> Optional[int]:
    """``len(index)`` when ``index`` is ``0, 1, ..., len - 1`` (a sequential unit's prefix), else None. Read on the
    host, so only for CPU indices (on a GPU the check would synchronise: the general path is taken there)."""
    key = id(index)
    if key not in known:
        length = None
        if index.device.type == "cpu" and index.dim() == 1 and index.numel() > 0:
            values = index.numpy()  # host reads without a dispatch per element
            n = values.shape[0]
            if values[0] == 0 and values[-1] == n - 1 and (n < 3 or bool((values[1:] > values[:-1]).all())):
                length = n  # strictly increasing integers from 0 to n - 1: exactly arange(n)
        known[key] = length
    return known[key]


def _prefix_region(piece: ChannelSlice, known: Dict[int, Optional[int]]) -> Optional[Region]:
    """(kept rows or None for all, kept columns or None for all) when ``piece`` keeps a leading block of its tensor,
    else None."""
    if piece.dim:
        return None
    rows = None if piece.rows is None else _prefix_length(piece.rows, known)
    if piece.rows is not None and rows is None:
        return None
    cols = None if piece.cols is None else _prefix_length(piece.cols, known)
    if piece.cols is not None and cols is None:
        return None
    return rows, cols


def _narrowed(tensor: Tensor, region: Region) -> Tensor:
    """The view of ``tensor``'s leading block ``region`` (shares its storage)."""
    rows, cols = region
    shape = list(tensor.shape)
    if rows is not None:
        shape[0] = rows
    if cols is not None:
        shape[1] = cols
    # one view op for both dims (two narrows cost twice the dispatch, on every tensor of every step)
    return tensor.as_strided(shape, tensor.stride(), tensor.storage_offset())
