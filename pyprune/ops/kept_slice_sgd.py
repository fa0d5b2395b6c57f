"""KeptSliceSGD: SGD whose step touches only the channels of the active subnet (for a new subnet every step).

In gather mode (the default) a training step on a subnet gathers each pruned tensor's kept channels, and autograd
scatters their gradient back into a *full-size* zero tensor; the optimizer then updates every channel, kept or not.
When the subnet changes every step (slimmable / one-shot / DMCP-style sampling) that full-size traffic is most of
the overhead over the exported subnet, and compact training mode does not help (its enter + exit per subnet costs
about a training step).

``KeptSliceSGD(model, lr, momentum, weight_decay, nesterov)`` is a :class:`torch.optim.Optimizer` over
``model.parameters()`` that, while it is attached, hands every DynamicOp of ``model`` its compact tensors for each
training forward as *leaf* tensors (gathered without autograd: nothing is scattered in backward), so the backward
computes gradients of the compact tensors only. Its :meth:`step` then runs torch's own SGD update
(``torch.optim.sgd.sgd``) on the compact parameters with the compact slices of their full-size momentum buffers, and
writes both back into the kept places (``index_copy_``; no host sync). Everything else (parameters outside the
DynamicOps, ops whose selection keeps every channel, ops gathering into an autocast dtype / channels_last layout)
gets a full ``.grad`` and exactly torch SGD's update.

Numerics ("lazy" SGD, as sparse / lazy Adam do for embeddings):

* **kept channels**: the same update as ``torch.optim.SGD`` with the same hyper-parameters, element for element
  (the same ``torch.optim.sgd.sgd`` code on the same values; the gradient is the same one autograd gathers);
* **dropped channels** (pruned in this step's subnet): *untouched* - value and momentum buffer stay as they are.
  ``torch.optim.SGD`` in gather mode instead gives them a zero gradient, so with ``momentum > 0`` their momentum
  keeps moving them (``buf = momentum * buf + weight_decay * w``, ``w -= lr * buf``) and weight decay shrinks them.
  The two agree exactly when ``momentum == 0 and weight_decay == 0``, or when no channel is ever dropped;
* a momentum buffer is created full-size (zeros) at a parameter's first step; its kept slice then starts as the
  gradient, as torch's first step does (``dampening`` is not supported: torch's first-step exception to it cannot
  be kept per channel).

The sliced parameters' ``.grad`` stays None (their gradient lives on the compact leaves until :meth:`step` or
:meth:`zero_grad`); ``state_dict`` / ``load_state_dict`` are the plain optimizer's (full-size momentum buffers).
Several forwards before one step (gradient accumulation) reuse the same leaves, so their gradients add up; a
selection change between a forward and the step is refused. One optimizer per model; :meth:`detach` removes the
hooks (the ops gather on their own again).
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.optim.sgd import sgd as _sgd_update

from .base import DynamicChannelMixin
from .compact_state import ChannelSlice, gather_slice, scatter_slice_

__all__ = ["KeptSliceSGD"]


class _OpLeaves:
    """What one op's training forward was handed: its selection version, the tuple handed to its provider, and
    ``(parameter, slice, compact leaf)`` per sliced parameter."""

    __slots__ = ("version", "handed", "params")

    def __init__(self, version: int, handed: tuple, params: List[Tuple[nn.Parameter, ChannelSlice, Tensor]]):
        self.version, self.handed, self.params = version, handed, params


class KeptSliceSGD(torch.optim.Optimizer):
    """SGD over ``model.parameters()`` updating only the active subnet's channels of the DynamicOps' tensors (see
    the module docstring for the numerics). ``lr``, ``momentum``, ``weight_decay``, ``nesterov``: as
    ``torch.optim.SGD``."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        for key, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"KeptSliceSGD: {key} must be a non-negative number, got {type(value).__name__} "
                                 f"{value!r}")
        if nesterov and momentum <= 0:
            raise ValueError("KeptSliceSGD: nesterov needs momentum > 0")
        super().__init__(model.parameters(), dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                                  nesterov=nesterov, dampening=0.0, maximize=False))
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
        for op in self.ops:
            if not op.training or op._holds_compact() or (x is not None and op._gather_form(x) is not None):
                continue  # gathers on its own (autograd path, full .grad)
            entry = self._leaves.get(id(op))
            if entry is None:
                entry = self._gather_leaves(op)
                if entry is None:
                    continue
                self._leaves[id(op)] = entry
            elif entry.version != op.selection_version:
                raise RuntimeError(f"KeptSliceSGD: the selection of {type(op).__name__} changed between a forward "
                                   f"and optimizer.step(); call step() or zero_grad() before changing the subnet")
            op.tensor_provider.hand(entry.handed)

    def _gather_leaves(self, op: DynamicChannelMixin) -> Optional[_OpLeaves]:
        slices = {piece.name: piece for piece in op._compact_layout()}
        if not slices or any(piece.dim for piece in slices.values()):
            return None
        handed, params = [], []
        with torch.no_grad():
            for name, source in zip(op._channel_tensors, op._source_tensors()):
                piece = slices.get(name)
                if piece is None:
                    handed.append(source)
                    continue
                compact = gather_slice(piece, source)
                if isinstance(source, nn.Parameter) and source.requires_grad:
                    compact.requires_grad_(True)
                    params.append((source, piece, compact))
                handed.append(compact)  # running statistics: a copy, carried back by the op's provider
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
        return [(p, piece, leaf.grad) for entry in self._leaves.values() for p, piece, leaf in entry.params]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("KeptSliceSGD: step(closure) is not supported (the closure's forward would hand new "
                             "leaves)")
        sliced = {}
        for entry in self._leaves.values():
            for p, piece, leaf in entry.params:
                if leaf.grad is not None:
                    if id(p) in sliced:
                        raise RuntimeError(f"KeptSliceSGD: parameter of shape {tuple(p.shape)} is sliced by two "
                                           f"ops in one step (shared tensors are not supported)")
                    sliced[id(p)] = (piece, leaf)
        for group in self.param_groups:
            self._step_group(group, sliced)
        self._leaves.clear()

    def _step_group(self, group: dict, sliced: Dict[int, Tuple[ChannelSlice, Tensor]]) -> None:
        options = dict(weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                       dampening=0.0, nesterov=group["nesterov"], maximize=False)
        momentum = group["momentum"] != 0
        # plain parameters: torch SGD on full tensors
        params, grads, buffers = [], [], []
        # sliced parameters: torch SGD on the compact copies and compact slices of the momentum buffers
        written, c_params, c_grads, c_buffers = [], [], [], []
        prefixes: Dict[int, Optional[int]] = {}  # id(index) -> prefix length (the index tensors live in `sliced`)
        for p in group["params"]:
            entry = sliced.get(id(p))
            if entry is not None:
                piece, leaf = entry
                state = self.state[p]
                full_buffer = state.get("momentum_buffer") if momentum else None
                if momentum and full_buffer is None:
                    # a kept slice of a fresh (zero) buffer: buf = momentum * 0 + grad = grad, torch's first step
                    full_buffer = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                c_grads.append(leaf.grad)
                region = _prefix_region(piece, prefixes)
                if region is not None:  # a prefix block: update the kept places in place, nothing to write back
                    c_params.append(_narrowed(p, region))
                    c_buffers.append(None if full_buffer is None else _narrowed(full_buffer, region))
                    continue
                c_params.append(leaf.detach())  # the kept values of p, gathered this step (p unchanged since)
                c_buffers.append(None if full_buffer is None else gather_slice(piece, full_buffer))
                written.append((p, piece, full_buffer, len(c_params) - 1))
            elif p.grad is not None:
                params.append(p)
                grads.append(p.grad)
                buffers.append(self.state[p].get("momentum_buffer"))
        if params:
            _sgd_update(params, grads, buffers, **options)
            if momentum:
                for p, buffer in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buffer
        if c_params:
            # foreach: one call per arithmetic op for the whole list (the same elementwise ops as the loop)
            _sgd_update(c_params, c_grads, c_buffers if momentum else [None] * len(c_params), foreach=True,
                        **options)
            for p, piece, full_buffer, n in written:
                scatter_slice_(p, c_params[n], piece)  # on p itself: its version counter moves (eval cache)
                if full_buffer is not None:
                    scatter_slice_(full_buffer, c_buffers[n], piece)


def _prefix_length(index: Optional[Tensor], known: Dict[int, Optional[int]]) -> Optional[int]:
    """``len(index)`` when ``index`` is ``0, 1, ..., len - 1`` (a sequential unit's prefix), else None. Read on the
    host, so only for CPU indices (on a GPU the check would synchronise: the general path is taken there)."""
    key = id(index)
    if key not in known:
        length = None
        if index.device.type == "cpu" and index.dim() == 1 and index.numel() > 0:
            n = index.numel()
            if int(index[0]) == 0 and int(index[-1]) == n - 1 and (n == 1 or bool((index[1:] > index[:-1]).all())):
                length = n  # strictly increasing integers from 0 to n - 1: exactly arange(n)
        known[key] = length
    return known[key]


def _prefix_region(piece: ChannelSlice, known: Dict[int, Optional[int]]) -> Optional[Tuple[Optional[int], ...]]:
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


def _narrowed(tensor: Tensor, region: Tuple[Optional[int], ...]) -> Tensor:
    """The view of ``tensor``'s leading block ``region`` (shares its storage)."""
    rows, cols = region
    view = tensor if rows is None else tensor.narrow(0, 0, rows)
    return view if cols is None else view.narrow(1, 0, cols)
