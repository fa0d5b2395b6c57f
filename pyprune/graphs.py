"""CUDA graphs for subnets: capture a training step (or an eval forward) once per subnet, then replay it.

A prepared (dynamic) model is sync-free, so a whole step - forward, loss, backward, optimizer step - can be captured
in one ``torch.cuda.CUDAGraph`` and replayed with one launch, which removes the host cost of the many small kernels
(the channel gathers among them) that dominates at small batch sizes. Shapes depend on the subnet, so a graph holds
for one subnet only: :class:`GraphedTrainStep` and :class:`GraphedEval` keep one graph per subnet in a small LRU
cache keyed by :meth:`pyprune.mutators.ChannelMutator.subnet_key`, and capture a new one when the subnet is new.

    mutator.prepare_from_supernet(model); model.cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = GraphedTrainStep(model, F.cross_entropy, optimizer, (images, labels), mutator=mutator)
    for images, labels in loader:                    # device tensors of the example's shapes
        mutator.set_choices(mutator.sample_choices())
        loss = step(images, labels)                  # one training step; eager the first time a subnet is seen

What happens per call: the inputs are copied into static buffers; the subnet's graph is replayed. A subnet seen for
the first time runs ``warmup_steps`` eager steps (real steps on those calls' batches, on a side stream, as PyTorch's
whole-network capture recipe asks), then its graph is captured on the next call and replayed at once, so every call
is exactly one training step. Batches whose shapes / dtypes differ from the example (a last partial batch) run
eagerly. The least recently used graph is dropped when more than ``cache_size`` subnets are cached (its private
memory pool is freed with it); each cached graph holds that subnet's activations and gradients.

What a graph bakes in, and how this module keeps it right:

* Index tensors: the graph reads each layer's channel index at fixed addresses. Switching away and back builds new
  index tensors with the same values; the graph keeps the ones it captured alive (every tensor the DynamicOps and
  channel tensors hold at capture time), so it replays the same subnet.
* The learning rate: a float would be frozen into the graph. Float learning rates become 0-dim device tensors
  (``group['lr']``); a float assigned to ``group['lr']`` later (``set_lr``, a scheduler) is copied into that tensor
  at the next call, so schedules keep working. Other hyper-parameters (momentum, weight decay) are part of the
  cache key: changing them captures anew.
* The optimizer must be capturable: groups with a ``capturable`` flag (Adam, AdamW, ...) get ``capturable=True``;
  groups with only a ``fused`` flag (SGD) get ``fused=True`` (and ``foreach=False``); other optimizers are refused.
* Autocast: its state (enabled, dtype) is part of the key; call under the same ``torch.autocast`` as you mean to
  train with. ``torch.amp.GradScaler`` is not supported (bf16 autocast needs none).
* Gradients: after a replay ``param.grad`` refers to the last *captured* graph's buffers, not necessarily the one
  just replayed. Nothing may read gradients between steps (Taylor importance does: train those pruning steps
  eagerly), nor may the parameters be replaced (``model.to()``, compact training mode) while graphs are cached;
  call :meth:`clear` after such changes.
* Eval caches: a replay changes weights without bumping their version counters, so the DynamicOps' eval-mode
  compact-weight caches are dropped after every replay (only populated ones: a few attribute reads per layer).

CPU: there are no CUDA graphs. ``backend="cuda-graph"`` (the default) raises ``RuntimeError`` naming the device
when the model is not on a CUDA device; ``backend="eager"`` runs the same machinery (cache, warm-up, static buffers)
with every "replay" re-running the step eagerly, so one script runs on both and the bookkeeping can be tested
without a GPU.

``torch.compile(model, mode="reduce-overhead")`` is the other route: it also works on a prepared model (inductor
with CUDA graph trees on CUDA, plain inductor on CPU), recompiling per subnet shape.
"""
import contextlib
import numbers
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops

BACKENDS = ("cuda-graph", "eager")
Inputs = Union[Tensor, Sequence[Tensor]]


# ---------------------------------------------------------------------------------------------------- capturing
class _Captured:
    """One captured body: ``replay()`` runs it again and returns its (static) outputs."""

    def __init__(self, body: Callable[[], Any], device: torch.device, backend: str):
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        if backend == "eager":
            self._body, self.outputs = body, None
            return
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(self.graph):
            self.outputs = body()
        self._body = None

    def replay(self):
        if self.graph is None:
            return self._body()
        self.graph.replay()
        return self.outputs


@contextlib.contextmanager
def _side_stream(device: torch.device, backend: str):
    """Eager warm-up runs on a side stream before a capture (PyTorch's recipe for whole-network capture)."""
    if backend == "eager" or device.type != "cuda":
        yield
        return
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    was = model.training
    if was != training:
        model.train(training)
    try:
        yield
    finally:
        if model.training != was:
            model.train(was)


def _used_here(tensor: Tensor) -> Tensor:
    """A tensor made on the warm-up side stream, now handed to the current stream: its memory must not be reused
    on the side stream before the current stream is done with it."""
    if tensor.is_cuda:
        tensor.record_stream(torch.cuda.current_stream(tensor.device))
    return tensor


def _held_tensors(model: nn.Module) -> List[Tensor]:
    """Every tensor the DynamicOps and channel tensors of ``model`` hold besides parameters and buffers (indices,
    derived indices, caches): what a captured graph reads at fixed addresses and must keep alive."""
    held = [t for module in model.modules() if isinstance(module, ops.DynamicChannelMixin)
            for t in module.held_tensors()]
    held += [slot.out_index for slot in ops.channel_parameters(model) if slot.out_index is not None]
    return held


def _dynamic_ops(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, ops.DynamicChannelMixin)]


def _subnet_key_fn(model: nn.Module, mutator, owner: str) -> Callable[[], Hashable]:
    if mutator is None:
        if _dynamic_ops(model):
            raise ValueError(f"{owner}: the model has DynamicOps, so its shapes change with the subnet; pass "
                             f"mutator=<its ChannelMutator> (or a function returning a key of the current subnet)")
        return tuple
    if hasattr(mutator, "subnet_key"):
        return mutator.subnet_key
    if callable(mutator):
        return mutator
    raise TypeError(f"{owner}: mutator must be a ChannelMutator or a callable returning a subnet key, got "
                    f"{type(mutator).__name__}")


def _autocast_state(device: torch.device) -> Tuple:
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return ()
    return (kind, torch.get_autocast_dtype(kind))


# ------------------------------------------------------------------------------------------------- the cache
class _Entry:
    __slots__ = ("captured", "held", "warm")

    def __init__(self):
        self.captured: Optional[_Captured] = None
        self.held: List[Tensor] = []
        self.warm = 0


class _SubnetGraphs:
    """What the train step and the eval forward share: the static inputs, the per-subnet LRU of graphs, stats."""

    def __init__(self, model: nn.Module, example: Sequence[Tensor], mutator, cache_size: int, warmup_steps: int,
                 backend: str):
        owner = type(self).__name__
        if backend not in BACKENDS:
            raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(cache_size, numbers.Integral) or isinstance(cache_size, bool) or cache_size < 1:
            raise ValueError(f"{owner}: cache_size must be an int >= 1, got {cache_size!r}")
        if not isinstance(warmup_steps, numbers.Integral) or isinstance(warmup_steps, bool) or warmup_steps < 1:
            raise ValueError(f"{owner}: warmup_steps must be an int >= 1 (a subnet's first step runs eagerly so "
                             f"that lazy state exists before capture), got {warmup_steps!r}")
        if not example or not all(isinstance(t, Tensor) for t in example):
            raise TypeError(f"{owner}: the example must be tensors, got {[type(t).__name__ for t in example]}")
        self.model, self.backend = model, backend
        self.device = next((p.device for p in model.parameters()), example[0].device)
        if backend == "cuda-graph" and self.device.type != "cuda":
            raise RuntimeError(f"{owner} needs CUDA: the model is on {self.device}. Move it to a GPU, run the step "
                               f"eagerly, or pass backend='eager' (same bookkeeping, no graphs)")
        bad = [str(t.device) for t in example if t.device != self.device]
        if bad:
            raise ValueError(f"{owner}: the example tensors must be on the model's device {self.device}, got {bad}")
        self.cache_size, self.warmup_steps = int(cache_size), int(warmup_steps)
        self._subnet_key = _subnet_key_fn(model, mutator, owner)
        self._static = [torch.empty_like(t) for t in example]
        self._graphs: "OrderedDict[Hashable, _Entry]" = OrderedDict()
        self._ops = _dynamic_ops(model)
        self.stats: Dict[str, int] = {"replays": 0, "captures": 0, "warmup": 0, "eager": 0, "evictions": 0}

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> List[Hashable]:
        """Cached subnet keys, least recently used first."""
        return list(self._graphs)

    def clear(self) -> None:
        """Drop every graph (and its memory pool); the next calls warm up and capture again."""
        self._graphs.clear()

    def _key(self) -> Hashable:
        return (self._subnet_key(), _autocast_state(self.device))

    def _fits(self, tensors: Sequence[Tensor]) -> bool:
        return len(tensors) == len(self._static) and all(
            isinstance(t, Tensor) and t.shape == s.shape and t.dtype == s.dtype and t.device == s.device
            for t, s in zip(tensors, self._static))

    def _entry(self, key: Hashable) -> _Entry:
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            return entry
        entry = self._graphs[key] = _Entry()
        while len(self._graphs) > self.cache_size:
            self._graphs.popitem(last=False)
            self.stats["evictions"] += 1
        return entry

    def _load(self, tensors: Sequence[Tensor]) -> None:
        for static, tensor in zip(self._static, tensors):
            static.copy_(tensor)

    def _capture(self, entry: _Entry, body: Callable[[], Any]) -> None:
        """Capture ``body`` for ``entry``'s subnet; a failed capture drops the entry (the next call warms up again)
        and says which subnet failed."""
        self._ops = _dynamic_ops(self.model)
        if any(ops.holds_compact(op) for op in self._ops):
            raise RuntimeError(f"{type(self).__name__}: a layer is in compact training mode, whose tensors are "
                               f"swapped per subnet; leave it (or do not graph that model)")
        try:
            entry.captured = _Captured(body, self.device, self.backend)
        except Exception as error:
            key = next((k for k, e in self._graphs.items() if e is entry), None)
            self._graphs.pop(key, None)
            raise RuntimeError(f"{type(self).__name__}: capturing the step of subnet {key!r} failed (a host sync or "
                               f"a CPU tensor in the step?): {type(error).__name__}: {error}") from error
        entry.held = _held_tensors(self.model)
        self.stats["captures"] += 1

    def _run(self, batch: Sequence[Tensor]) -> Tuple[Any, bool]:
        """One call on ``batch``: eager when it does not fit the static buffers; for a new subnet, eager warm-up
        steps (on a side stream) and then its capture (:meth:`_capture_new`); afterwards a replay. Returns (the
        output, whether it came from a replay: then it lives in the graph's static memory)."""
        if not self._fits(batch):
            self.stats["eager"] += 1
            return self._eager(batch), False
        entry = self._entry(self._key())
        if entry.captured is None:
            if entry.warm < self.warmup_steps:
                entry.warm += 1
                self.stats["warmup"] += 1
                with _side_stream(self.device, self.backend):
                    output = self._eager(batch)
                return _used_here(output), False
            self._load(batch)
            self._capture_new(entry)
        else:
            self._load(batch)
        output = entry.captured.replay()
        self.stats["replays"] += 1
        return output, True

    def _capture_new(self, entry: "_Entry") -> None:
        raise NotImplementedError

    def _drop_eval_caches(self) -> None:
        for op in self._ops:
            op.clear_cache()


# ------------------------------------------------------------------------------------------------ train step
class GraphedTrainStep(_SubnetGraphs):
    """One training step (forward, ``loss_fn``, backward, ``optimizer.step()``) per call, replayed from a CUDA graph
    captured for the current subnet (see the module doc for what is captured and what keeps it right).

    Args:
        model: a prepared (dynamic) model or a plain one, on a CUDA device (``backend='eager'``: any device).
        loss_fn: ``loss_fn(model(*inputs), target) -> scalar loss``.
        optimizer: over the model's parameters; prepared in place for capture (tensor learning rates, capturable
            or fused implementation; see the module doc). Do not call ``zero_grad``: the step does.
        example_batch: ``(inputs, target)``; ``inputs`` a tensor or a tuple of tensors. Only shapes, dtypes,
            devices and memory formats are used (static buffers are made like them).
        mutator: the model's :class:`~pyprune.mutators.ChannelMutator` (graphs are keyed by its ``subnet_key()``)
            or a callable returning a hashable subnet key; ``None`` for a model without DynamicOps.
        cache_size: subnets whose graphs are kept (least recently used dropped first).
        warmup_steps: eager steps a new subnet takes before it is captured (>= 1).
        backend: ``'cuda-graph'`` or ``'eager'`` (no graphs; for CPU and tests).

    Call: ``step(inputs, target) -> loss`` (a detached copy, on the device; reading it with ``.item()`` syncs).
    ``stats``: counts of replays, captures, warm-up and other eager steps, evictions.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 optimizer: torch.optim.Optimizer, example_batch: Tuple[Inputs, Tensor], *, mutator=None,
                 cache_size: int = 4, warmup_steps: int = 1, backend: str = "cuda-graph"):
        inputs, target = _split_batch(example_batch, "GraphedTrainStep: example_batch")
        super().__init__(model, inputs + (target,), mutator, cache_size, warmup_steps, backend)
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self._num_inputs = len(inputs)
        self._hyper_names = [[k for k, v in group.items() if k not in ("params", "lr", "initial_lr")
                              and _is_hyper_value(v)] for group in optimizer.param_groups]
        self._lrs = _prepare_optimizer(optimizer, self.device, capture=backend == "cuda-graph")

    def _key(self) -> Hashable:
        hyper = tuple(tuple(group[k] for k in names)
                      for group, names in zip(self.optimizer.param_groups, self._hyper_names))
        return super()._key() + (hyper,)

    def __call__(self, inputs: Inputs, target: Tensor) -> Tensor:
        self._lrs.sync(self.optimizer)
        loss, replayed = self._run(_as_tuple(inputs) + (target,))
        if not replayed:
            return loss
        self._drop_eval_caches()
        return loss.detach().clone()

    def _capture_new(self, entry: "_Entry") -> None:
        with _mode(self.model, True):
            self._capture(entry, self._body)

    def _body(self) -> Tensor:
        # Grads set to None here: a captured backward then allocates its grads in the graph's pool and writes
        # (not accumulates) them on every replay. No kernel: the capture records nothing for it.
        self.optimizer.zero_grad(set_to_none=True)
        *inputs, target = self._static
        loss = self.loss_fn(self.model(*inputs), target)
        loss.backward()
        self.optimizer.step()
        return loss

    def _eager(self, batch: Sequence[Tensor]) -> Tensor:
        *inputs, target = batch
        with _mode(self.model, True):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(*inputs), target)
            loss.backward()
            self.optimizer.step()
        return loss.detach()


# ------------------------------------------------------------------------------------------------------- eval
class GraphedEval(_SubnetGraphs):
    """The model's eval-mode forward (no grad), replayed from a CUDA graph captured per subnet.

    Args as :class:`GraphedTrainStep` (``example_input``: a tensor or a tuple of tensors). The graph gathers the
    compact weights itself on every replay, so it stays right while the weights train. Call: ``forward(*inputs)``
    returns a copy of the output.
    """

    def __init__(self, model: nn.Module, example_input: Inputs, *, mutator=None, cache_size: int = 4,
                 warmup_steps: int = 1, backend: str = "cuda-graph"):
        super().__init__(model, _as_tuple(example_input), mutator, cache_size, warmup_steps, backend)

    def __call__(self, *inputs: Tensor) -> Tensor:
        with torch.no_grad():
            output, replayed = self._run(tuple(inputs))
        return output.clone() if replayed else output

    def _capture_new(self, entry: "_Entry") -> None:
        self._drop_eval_caches()  # so that the graph gathers the weights instead of reading a cached copy
        with _mode(self.model, False), torch.no_grad():
            self._capture(entry, lambda: self.model(*self._static))
        self._drop_eval_caches()  # the capture filled them with tensors that hold values only after a replay

    def _eager(self, inputs: Sequence[Tensor]) -> Tensor:
        with _mode(self.model, False), torch.no_grad():
            return self.model(*inputs)


# ------------------------------------------------------------------------------------------------- optimizer
class _LearningRates:
    """Each param group's learning rate as one 0-dim device tensor that captured graphs read."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.tensors: List[Tensor] = []
        for group in optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, Tensor) and lr.device == device and lr.dtype == torch.float32 and lr.dim() == 0:
                tensor = lr
            else:
                tensor = torch.tensor(float(lr), dtype=torch.float32, device=device)
            group["lr"] = tensor
            self.tensors.append(tensor)

    def sync(self, optimizer: torch.optim.Optimizer) -> None:
        """Take a learning rate assigned since the last call (a float or another tensor) into the graphs' tensor."""
        for group, tensor in zip(optimizer.param_groups, self.tensors):
            lr = group["lr"]
            if lr is tensor:
                continue
            if isinstance(lr, Tensor):
                tensor.copy_(lr.reshape(()))
            else:
                tensor.fill_(float(lr))
            group["lr"] = tensor


def _prepare_optimizer(optimizer: torch.optim.Optimizer, device: torch.device, capture: bool) -> _LearningRates:
    """Make ``optimizer`` safe to capture (see the module doc); validated before anything is changed."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"GraphedTrainStep: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if capture:
        refused = [i for i, g in enumerate(optimizer.param_groups)
                   if not g.get("capturable") and not g.get("fused") and "capturable" not in g and "fused" not in g]
        if refused:
            raise ValueError(f"GraphedTrainStep: {type(optimizer).__name__} param groups {refused} can be neither "
                             f"capturable nor fused, so its step cannot be captured in a CUDA graph")
        for group in optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
            elif not group.get("fused"):
                group["fused"], group["foreach"] = True, False
        for state in optimizer.state.values():  # capturable / fused steps keep their step counter on the device
            step = state.get("step")
            if isinstance(step, Tensor) and step.device != device:
                state["step"] = step.to(device=device, dtype=torch.float32)
        optimizer._warned_capturable_if_run_uncaptured = True  # the warm-up steps are meant to run uncaptured
    return _LearningRates(optimizer, device)


def _is_hyper_value(value) -> bool:
    if isinstance(value, (bool, numbers.Number, str)) or value is None:
        return True
    return isinstance(value, tuple) and all(isinstance(v, numbers.Number) for v in value)


# ------------------------------------------------------------------------------------------------------ helpers
def _as_tuple(inputs: Inputs) -> Tuple[Tensor, ...]:
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


def _split_batch(batch, where: str) -> Tuple[Tuple[Tensor, ...], Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[1], Tensor):
        raise TypeError(f"{where} must be (inputs, target) with target a tensor, got {type(batch).__name__}")
    return _as_tuple(batch[0]), batch[1]


__all__ = ["GraphedTrainStep", "GraphedEval", "BACKENDS"]
