"""TensorProvider: the one place a DynamicOp gets its channel tensors at the active width from.

Every DynamicOp's forward asks ``self.active_tensors(x)`` for its ``_channel_tensors`` (weight, bias, running
stats, ...) at the active width, and never asks *how* they are made. The op's :class:`TensorProvider` answers, from
the first of these that applies:

1. a **hand-off**: tensors gathered for this forward already, with every other op's, by
   :func:`pyprune.ops.batched_gather` (used once);
2. an installed **source**: compact training mode installs the op's :class:`~pyprune.ops.compact_state.CompactOpState`,
   whose tensors *are* the compact ones (returned as they are);
3. the **gather**: ``op._gather_compact(form)``, which gathers each slice of ``op._compact_layout()`` (the one
   description of which channels each tensor keeps), served from an eval cache when no gradient is needed.

A forward that writes into its compact tensors in place (``F.batch_norm``'s running statistics) hands them back with
``self.carry_writes({name: tensor})``: the provider carries the update into the full tensors when they were gathered
copies, and does nothing when they are the held tensors themselves. The same two calls serve layers whose own
``forward`` pyprune does not own (:mod:`pyprune.ops.served`).
"""
from typing import Dict, List, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .. import kernels
from .compact_state import scatter_slice_

__all__ = ["TensorProvider", "TensorSource"]

Form = Optional[Tuple[Optional[torch.dtype], Optional[torch.memory_format]]]


class TensorSource(Protocol):
    """What an installed source answers (compact training mode's per-op state is one)."""

    def held_tensors(self, op) -> Optional[tuple]:
        """The op's tensors at the active width when this source holds them, else None (the provider gathers)."""
        raise NotImplementedError

    def full_tensors(self) -> Dict[str, Tensor]:
        """``{tensor name: full-size data with the current values written back}`` for the tensors it holds."""
        raise NotImplementedError

    def selection_changed(self, op) -> None:
        """The op's selection changed: follow it."""


class TensorProvider:
    """Per-op: the installed source, the batched hand-off and the eval cache (see the module docstring)."""

    def __init__(self):
        self.source: Optional[TensorSource] = None
        self.handed: Optional[tuple] = None
        self.cache: Optional[tuple] = None  # (key, the source tensors the key names, compact tensors)
        self._slices: Optional[tuple] = None  # (selection version, {tensor name: slice of op._compact_layout()})

    # ------------------------------------------------------------------------------------------------- answers
    def tensors(self, op, x: Optional[Tensor] = None) -> tuple:
        """``op``'s channel tensors at the active width, for input ``x`` (which decides the gather's dtype /
        layout form, see ``DynamicChannelMixin._gather_form``)."""
        handed = self.handed
        if handed is not None:
            self.handed = None
            if x is None or op._gather_form(x) is None:  # the batched gather writes the plain form only
                return handed
        held = self.held_tensors(op)
        if held is not None:
            return held
        return self._gathered(op, None if x is None else op._gather_form(x))

    def held_tensors(self, op) -> Optional[tuple]:
        source = self.source
        return None if source is None else source.held_tensors(op)

    def holds(self, op) -> bool:
        """Whether ``op``'s channel tensors are the compact ones right now (compact training mode)."""
        return self.held_tensors(op) is not None

    def tensors_to_export(self, op) -> tuple:
        """As :meth:`tensors`, without the hand-off or the cache (export, summaries)."""
        held = self.held_tensors(op)
        return held if held is not None else op._gather_compact()

    def full_tensor(self, op, name: str) -> Optional[Tensor]:
        """``op``'s tensor ``name`` at full size (detached; held values written back first)."""
        if self.holds(op):
            full = self.source.full_tensors().get(name)
            if full is not None:
                return full
        tensor = _attribute(op, name)
        return None if tensor is None else tensor.detach()

    # ---------------------------------------------------------------------------------------------- write-back
    def carry_writes(self, op, written: Dict[str, Tensor]) -> None:
        """Carry in-place updates of compact tensors (``{name: compact tensor}``) into the full ones. Gathered copies
        only: held tensors, tensors returned whole (nothing pruned) and views of the full tensors (a kept-slice
        optimizer's leading blocks) already wrote into the full ones."""
        if self.holds(op):
            return
        full = dict(zip(op._channel_tensors, op._source_tensors()))
        pending = {name: t for name, t in written.items() if t is not None and not _writes_through(t, full.get(name))}
        if not pending:
            return
        slices = self.slices(op)
        mean, var = pending.pop("running_mean", None), pending.pop("running_var", None)
        if mean is not None and var is not None and slices["running_mean"].rows is slices["running_var"].rows:
            # both running statistics in one in-place launch (no host sync)
            kernels.update_running_stats_(full["running_mean"], full["running_var"], slices["running_mean"].rows,
                                          mean, var)
        else:
            pending.update({name: t for name, t in (("running_mean", mean), ("running_var", var)) if t is not None})
        with torch.no_grad():  # scatter_slice_ is the exact inverse of the gather
            for name, tensor in pending.items():
                scatter_slice_(full[name], tensor, slices[name])

    def slices(self, op) -> dict:
        """``{tensor name: slice}`` of ``op._compact_layout()``, built once per selection (a batch norm's training
        forward carries its running statistics back through these on every call). The slices keep the selection's
        rows / cols only, not the tensors: a parameter replaced meanwhile is read fresh and not kept alive."""
        version = op.selection_version
        if self._slices is None or self._slices[0] != version:
            self._slices = (version, {piece.name: piece._replace(tensor=None) for piece in op._compact_layout()})
        return self._slices[1]

    # ------------------------------------------------------------------------------------------------- changes
    def hand(self, tensors: tuple) -> None:
        """Tensors gathered for the op's next call (batched gather); used once."""
        self.handed = tensors

    def drop_handed(self) -> None:
        self.handed = None

    def install(self, source: Optional[TensorSource]) -> None:
        """Serve from ``source`` (None: back to gathering)."""
        self.source, self.cache, self.handed, self._slices = source, None, None, None

    def selection_changed(self, op) -> None:
        self.cache, self.handed, self._slices = None, None, None
        if self.source is not None:
            self.source.selection_changed(op)

    def clear_cache(self) -> None:
        """Drop what was derived from the op's tensors and indices: the eval cache and the slices (after ``.data``
        writes, and after a device move, which moves the indices without a new selection)."""
        self.cache, self._slices = None, None

    def held_device_tensors(self) -> List[Tensor]:
        """Tensors the provider keeps alive besides the op's parameters and buffers (the eval cache's copies)."""
        if self.cache is None:
            return []
        return [t for t in self.cache[2] if isinstance(t, Tensor)]

    # ----------------------------------------------------------------------------------------------- gathering
    def _gathered(self, op, form: Form) -> tuple:
        """Fresh compact tensors, or in eval mode without a gradient the cached ones.

        The cache key is (selection version, each source tensor's identity and ``_version``, device, dtype, form),
        so an in-place update (optimizer step, ``load_state_dict``, ``copy_`` under no_grad) or a new selection
        invalidates it. Writes through ``tensor.data`` bypass the version counter: ``op.clear_cache()`` after
        those. Training and ``torch.compile`` always gather (the compiled graph owns the gather).
        """
        if op.training or torch.compiler.is_compiling():
            return op._gather_compact(form)
        sources = op._source_tensors()
        key = [op.selection_version]
        needs_grad = torch.is_grad_enabled()
        try:
            for tensor in sources:
                if tensor is not None:
                    if needs_grad and tensor.requires_grad:
                        return op._gather_compact(form)  # a cached compact tensor would carry a stale graph
                    key += (id(tensor), tensor._version)
        except RuntimeError:  # inference tensors have no version counter: never cache them
            return op._gather_compact(form)
        if len(key) == 1:
            return op._gather_compact(form)  # nothing to gather (e.g. LayerNorm without affine)
        first = next(tensor for tensor in sources if tensor is not None)
        key += (first.device, first.dtype, form)
        cache = self.cache
        if cache is not None and cache[0] == key:
            return cache[2]
        compact = op._gather_compact(form)
        # the sources are held with the key so that their ids cannot be reused by other tensors meanwhile
        self.cache = (key, sources, compact)
        return compact


def _writes_through(tensor: Tensor, full: Optional[Tensor]) -> bool:
    """Whether an in-place write into ``tensor`` already is one into ``full``: it is ``full`` or a view of it."""
    return full is not None and (tensor is full or tensor._base is full)


def _attribute(module, path: str):
    """``module``'s attribute at a dotted ``path`` (``"weight"``, ``"out_proj.bias"``)."""
    for part in path.split("."):
        module = getattr(module, part)
    return module
