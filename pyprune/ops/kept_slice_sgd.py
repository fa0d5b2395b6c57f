"""KeptSliceSGD: SGD whose backward and step touch only the channels of the active subnet (for a new subnet every
step); the kept-slice machinery is :mod:`.kept_slice`.

``KeptSliceSGD(model, lr, momentum, weight_decay, nesterov)`` runs torch's own SGD update
(``torch.optim.sgd.sgd``) on the compact parameters with the kept places of their full-size momentum buffers.

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
"""
from typing import List

import torch
from torch import nn
from torch.optim.sgd import sgd as _sgd_update

from .kept_slice import KeptSliceOptimizer, KeptSlot

__all__ = ["KeptSliceSGD"]


class KeptSliceSGD(KeptSliceOptimizer):
    """SGD over ``model.parameters()`` updating only the active subnet's channels of the DynamicOps' tensors (see
    the module docstring for the numerics). ``lr``, ``momentum``, ``weight_decay``, ``nesterov``: as
    ``torch.optim.SGD``."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        for key, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"KeptSliceSGD: {key} must be a non-negative number, got {type(value).__name__} "
                                 f"{value!r}")
        if nesterov and momentum <= 0:
            raise ValueError("KeptSliceSGD: nesterov needs momentum > 0")
        super().__init__(model, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                     dampening=0.0, maximize=False))

    def _update_group(self, group: dict, plain: List[nn.Parameter], slots: List[KeptSlot]) -> None:
        options = dict(weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                       dampening=0.0, nesterov=group["nesterov"], maximize=False)
        momentum = group["momentum"] != 0
        if plain:  # torch SGD on full tensors
            buffers = [self.state[p].get("momentum_buffer") for p in plain]
            _sgd_update(plain, [p.grad for p in plain], buffers, **options)
            if momentum:
                for p, buffer in zip(plain, buffers):
                    self.state[p]["momentum_buffer"] = buffer
        if not slots:
            return
        buffers = [None] * len(slots)
        if momentum:
            for n, slot in enumerate(slots):
                state = self.state[slot.param]
                if "momentum_buffer" not in state:
                    # a kept slice of a fresh (zero) buffer: buf = momentum * 0 + grad = grad, torch's first step
                    state["momentum_buffer"] = torch.zeros_like(slot.param, memory_format=torch.preserve_format)
                buffers[n] = slot.kept(state["momentum_buffer"])
        # foreach: one call per arithmetic op for the whole list (the same elementwise ops as the loop)
        _sgd_update([s.value for s in slots], [s.grad for s in slots], buffers, foreach=True, **options)
