"""Batched gather: every DynamicOp's compact tensors of a training step in one kernel call (and one scatter back).

Per-op gathering costs one dispatcher call and one autograd node per pruned tensor: ~300 calls for a ResNet-50
training step, each 20-28 us of host time on a GPU for 2-4 us of copying (benchmarks/RESULTS.md). ``batched_gather``
puts a forward pre-hook on the model's root that, in a training forward with grad, gathers the pruned channel tensors
of every DynamicOp in one :func:`pyprune.kernels.gather_channels_many` call (one launch on CUDA; its backward is one
``channel_scatter_many``) and hands each op its compact tensors for this forward; the op's tensor provider
(:class:`~pyprune.ops.provider.TensorProvider`) serves them to its next ``active_tensors()`` once. Everything else keeps the per-op path:

* eval or no-grad forwards (the eval cache already serves those), and ``torch.compile`` (the compiled graph has its
  own gathers; ``fullgraph=True`` still compiles);
* ops in compact training mode (they gather nothing), ops whose selection keeps every channel, ops whose tensors
  are not all gathered along dims 0 / 1 (attention's ``bias_k``), ops in eval mode;
* conv / linear ops while autocast is on for the model's device, and convs fed a channels_last input: those gather
  straight into the autocast dtype / layout (``DynamicChannelMixin._gather_form``), which the multi-tensor op does
  not do;
* an op called twice in one forward (shared layers): the second call gathers on its own.

A forward hook (``always_call``) drops what the forward did not use, so nothing gathered for one step can reach
another. Sync-free like the per-op path: the hook reads only Python state (indices, counts, flags).
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import kernels
from .base import DynamicChannelMixin

__all__ = ["BatchedGather", "batched_gather"]


class BatchedGather:
    """The installed hooks of :func:`batched_gather`; ``remove()`` uninstalls them.

    ``ops``: the model's DynamicOps (found at install; call :meth:`refresh` after replacing layers).
    ``gathers``: how many batched gathers ran (one per training forward that used them).
    ``enabled``: set False to pause it (the ops gather on their own) without removing the hooks.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.ops: List[DynamicChannelMixin] = []
        self.gathers = 0
        self.enabled = True
        self.refresh()
        self._handles = (model.register_forward_pre_hook(self._before_forward),
                         model.register_forward_hook(self._after_forward, always_call=True))

    def refresh(self) -> None:
        """Find the model's DynamicOps again (after layers were swapped)."""
        self.ops = [m for m in self.model.modules() if isinstance(m, DynamicChannelMixin)]

    def remove(self) -> None:
        """Uninstall the hooks; the ops gather on their own again."""
        for handle in self._handles:
            handle.remove()
        self._drop_pending()

    # ------------------------------------------------------------------------------------------------------ hooks
    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling() or not (self.enabled and torch.is_grad_enabled()):
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return  # the many-op reads a pinned host table per call, which a graph replay would read stale
        plan = self._plan(_first_tensor(args))
        if not plan:
            return
        tensors = [piece.tensor for _, _, slices in plan for piece in slices]
        rows = [piece.rows for _, _, slices in plan for piece in slices]
        cols = [piece.cols for _, _, slices in plan for piece in slices]
        compact = iter(kernels.gather_channels_many(tensors, rows, cols))
        for op, sources, slices in plan:
            gathered = {piece.name: next(compact) for piece in slices}
            op.tensor_provider.hand(tuple(gathered.get(name, source)
                                          for name, source in zip(op._channel_tensors, sources)))
        self.gathers += 1

    def _after_forward(self, module: nn.Module, args: tuple, output) -> None:
        if not torch.compiler.is_compiling():
            self._drop_pending()

    def _drop_pending(self) -> None:
        for op in self.ops:
            op.tensor_provider.drop_handed()

    # ------------------------------------------------------------------------------------------------------- plan
    def _plan(self, x: Optional[Tensor]) -> List[Tuple[DynamicChannelMixin, list, list]]:
        """(op, its source tensors, the slices to gather) for every op this forward batches."""
        device_type = x.device.type if x is not None else None
        autocast = device_type is not None and torch.is_autocast_enabled(device_type)
        channels_last = x is not None and x.dim() in (4, 5) and not x.is_contiguous()
        plan = []
        for op in self.ops:
            if not op.training or op._holds_compact():
                continue
            if (autocast or channels_last) and type(op)._gather_form is not DynamicChannelMixin._gather_form:
                continue  # gathers in the autocast dtype / layout on its own
            slices = op._compact_layout()
            if slices and all(piece.dim == 0 for piece in slices):
                plan.append((op, op._source_tensors(), slices))
        return plan


def batched_gather(model: nn.Module) -> BatchedGather:
    """Gather the compact tensors of all of ``model``'s DynamicOps in one call per training forward (see the
    module docstring for what stays per op). Returns the handle; ``handle.remove()`` turns it off.

    Opt-in: on the CPU the per-op gathers are already cheap (no launches), so the batch mostly saves host time on
    a GPU. Install it after ``prepare_from_supernet`` (the ops must exist); it works with DDP wrapping ``model``.
    """
    return BatchedGather(model)


def _first_tensor(args: Sequence) -> Optional[Tensor]:
    for arg in args:
        if isinstance(arg, Tensor):
            return arg
    return None
