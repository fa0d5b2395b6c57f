"""One training iteration, however it runs: eager, under autocast / channels_last, or replayed from a CUDA graph.

:class:`TrainStep` is the one step runner of the job (each of ``pyprune prune``'s ``--amp``, ``--channels-last`` and
``--cuda-graphs`` options picks a way to run it) and of the model benchmark's eager backends.
"""
import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


class TrainStep:
    """``step(images, labels, algorithm=None) -> loss``: forward, loss, backward, ``algorithm.after_backward()``
    (importance from the gradients, only when an algorithm is given), optimizer step.

    ``images``: ``[N, C, H, W]`` and ``labels``: int64 ``[N]``, on the model's device; returns the loss, a float32
    0-dim tensor, detached and not synced to the host. ``model`` is put in train mode each step; ``forward``
    computes the logits (default ``model``; e.g. a ``torch.compile``'d ``model``). The ways to run it:

    * eager (the default): exactly forward, ``loss.backward()``, ``optimizer.step()``;
    * ``amp='bf16'`` / ``'fp16'``: forward and loss under ``torch.autocast`` in that dtype; fp16 scales the loss
      with :attr:`scaler` (a ``GradScaler``, enabled for fp16 only) and unscales the gradients before the
      algorithm reads them; ``channels_last``: the batch is converted to ``channels_last`` first;
    * ``cuda_graphs`` (with ``mutator``, neither of the above): replayed from the current subnet's CUDA graph
      (:class:`pyprune.graphs.GraphedTrainStep`, captured on first use, ``graph_cache_size`` subnets kept; a
      pruning step changes the subnet key, so the next step captures anew). Steps given an algorithm whose units
      learn importance from gradients stay eager: they read the gradients after backward.

    :attr:`model` may be replaced between steps (e.g. by a rebuilt ``DistributedDataParallel``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, loss_fn: LossFn = F.cross_entropy,
                 forward: Optional[Callable[[Tensor], Tensor]] = None, amp: Optional[str] = None,
                 channels_last: bool = False, cuda_graphs: bool = False, mutator=None, graph_cache_size: int = 2,
                 device_type: Optional[str] = None):
        if amp not in (None, "bf16", "fp16"):
            raise ValueError(f"TrainStep: amp must be None, 'bf16' or 'fp16', got {amp!r}")
        self.model, self.optimizer, self.loss_fn, self._forward = model, optimizer, loss_fn, forward  # may be None
        self.amp, self.channels_last = amp, channels_last
        self.cuda_graphs, self.mutator, self.graph_cache_size = cuda_graphs, mutator, graph_cache_size
        if device_type is None:
            device_type = next((p.device.type for p in model.parameters()), "cpu")
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type, enabled=amp == "fp16")  # checkpointed by the job
        self.graphed = None  # the GraphedTrainStep, made on the first graphed step

    def __call__(self, images: Tensor, labels: Tensor, algorithm=None) -> Tensor:
        if self._replays(algorithm):
            return self._graphed_step(images, labels)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._precision():
            forward = self.model if self._forward is None else self._forward  # (a compiled module has no bool())
            loss = self.loss_fn(forward(images), labels)
        self.scaler.scale(loss).backward()  # a disabled scaler (all but fp16) returns ``loss`` itself
        if algorithm is not None:
            self.scaler.unscale_(self.optimizer)  # importance from true gradients (no-op when disabled)
            algorithm.after_backward()
        self.scaler.step(self.optimizer)  # disabled: optimizer.step()
        self.scaler.update()
        loss = loss.detach()
        return loss if loss.dtype == torch.float32 else loss.float()

    def _precision(self):
        if self.amp is None:
            return contextlib.nullcontext()  # no autocast state change at all on the default path
        dtype = torch.float16 if self.amp == "fp16" else torch.bfloat16
        return torch.autocast(self.device_type, dtype=dtype)

    def _replays(self, algorithm) -> bool:
        if not self.cuda_graphs or self.amp is not None or self.channels_last:
            return False
        if algorithm is None:
            return True
        from ...algorithms.unit_state import learns_importance
        return not any(learns_importance(u) for u in self.mutator.mutable_units)

    def _graphed_step(self, images: Tensor, labels: Tensor) -> Tensor:
        if self.graphed is None:
            from ...graphs import GraphedTrainStep
            self.graphed = GraphedTrainStep(self.model, self.loss_fn, self.optimizer, (images, labels),
                                            mutator=self.mutator, cache_size=self.graph_cache_size)
        return self.graphed(images, labels)


__all__ = ["TrainStep"]
