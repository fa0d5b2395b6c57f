"""Compact training mode: train a fixed subnet at the exported model's speed, without leaving the dynamic model.

While the mode is on, every pruned channel tensor of every DynamicOp (weights, biases, norm affine parameters and
BatchNorm running statistics, attention projections) *is* its compact copy: the same ``nn.Parameter`` / buffer
object, with ``.data`` swapped for the kept channels. Forward gathers nothing, backward scatters nothing, the
optimizer steps and DDP all-reduces compact tensors. The full-size data is set aside untouched, so a channel that
is pruned keeps its value (and its optimizer state) until it is selected again::

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pyprune.ops.compact_training(model, optimizer) as session:
        for x, y in loader:                              # trains exactly what the exported model would
            ...
        with session.paused():                           # full-size tensors inside: change the selection here
            mutator.set_choices(new_choices)
    # outside: back to gather mode, every value written back into the full tensors

See docs/ARCHITECTURE.md ("Compact training mode") for the contract: state_dict / load / export / deep copies,
optimizer state, DDP, and which tensors stay in gather mode (``ChannelParameter``).
"""
import contextlib
import warnings
import weakref
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch import Tensor, nn

from ..errors import ConfigError
from ..utils.modules import unwrap_model
from .base import DynamicChannelMixin
from .compact_state import ChannelSlice, CompactOpState, HeldTensor, gather_slice, scatter_slice_, state_of
from .parameter import channel_parameters
from .registry import DYNAMIC_OPS

__all__ = ["CompactTraining", "compact_training", "release_compact", "rebuild_ddp", "holds_compact"]

Optimizers = Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer], None]

_ACTIVE: "weakref.WeakSet[CompactTraining]" = weakref.WeakSet()  # sessions in compact mode (checked at every step)
_STEP_HOOK = None                                                # the global optimizer step pre-hook's handle


_state = state_of  # the compact-mode state of a module, or None


def _as_list(optimizers: Optimizers) -> List[torch.optim.Optimizer]:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    optimizers = list(optimizers)
    for optimizer in optimizers:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"compact_training: optimizers must be torch.optim.Optimizer objects, got "
                              f"{type(optimizer).__name__}")
    return optimizers


# ----------------------------------------------------------------------------------------------- module hooks
# Registered on every op of a session; plain functions (not closures) so that deep copies and pickles of the model
# carry no reference to the session. Each reads the op's own CompactOpState.
def _full_state_dict_hook(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """state_dict in compact mode: the full-size tensors (compact values written back), same keys as always."""
    state = _state(module)
    if state is None or not (state.held or state.borrowed):
        return
    for name, full in state.full_tensors().items():
        if prefix + name in state_dict:
            state_dict[prefix + name] = full


def _release_before_load(module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs) -> None:
    """load_state_dict: the checkpoint holds full-size tensors, so load them into the full data."""
    state = _state(module)
    if state is not None:
        state.loading = True
        state.release(module)


def _compact_after_load(module: nn.Module, incompatible_keys) -> None:
    """After the op and its submodules loaded: hold the (possibly new) selection's compact tensors again."""
    state = _state(module)
    if state is not None and state.loading:
        state.loading = False
        if not state.suspended:
            state.compact(module)


def _check_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global step pre-hook while a session is on: an optimizer the session does not know must not step compact
    parameters (its state would not follow the selection)."""
    for session in list(_ACTIVE):
        session._check_step(optimizer)


def holds_compact(layer) -> bool:
    """Whether ``layer``'s channel tensors (and so their ``.grad``) are the compact ones right now."""
    holds = getattr(layer, "_holds_compact", None)
    return bool(holds is not None and holds())


def release_compact(model: nn.Module) -> None:
    """Leave compact form for good in every op of ``model`` that holds compact tensors without a session (a deep
    copy or an unpickled model made in compact mode): values written back, full tensors swapped in."""
    for module in unwrap_model(model).modules():
        state = _state(module)
        if state is not None and state.session is None:
            state.suspended = True
            state.release(module)
            module.tensor_provider.install(None)


def rebuild_ddp(wrapper: nn.parallel.DistributedDataParallel) -> nn.parallel.DistributedDataParallel:
    """A new DistributedDataParallel around ``wrapper.module`` with the same settings; ``wrapper`` is dismantled.

    DDP binds its buckets to the parameter shapes when it is built, and its reducer keeps every parameter's
    gradient accumulator (with the shape it had) alive. In compact mode the shapes change with the selection, so
    after every structure change (on every rank, at the same step) call ``ddp = rebuild_ddp(ddp)``: the old reducer
    is dropped *before* the new one is built, so the new one sees the compact shapes. Do not use ``wrapper`` again.
    """
    settings = dict(device_ids=wrapper.device_ids, output_device=wrapper.output_device, dim=wrapper.dim,
                    process_group=wrapper.process_group, bucket_cap_mb=wrapper.bucket_bytes_cap / (1024 * 1024),
                    find_unused_parameters=wrapper.find_unused_parameters,
                    gradient_as_bucket_view=wrapper.gradient_as_bucket_view, static_graph=wrapper.static_graph)
    if hasattr(wrapper, "forward_sync_buffers"):  # torch >= 2.14 renamed broadcast_buffers
        settings["forward_sync_buffers"] = wrapper.forward_sync_buffers
    else:
        settings["broadcast_buffers"] = wrapper.broadcast_buffers
    wrapper._remove_autograd_hooks()
    for name in ("reducer", "logger"):  # the reducer holds the gradient accumulators with the old shapes
        wrapper.__dict__.pop(name, None)
    return nn.parallel.DistributedDataParallel(wrapper.module, **settings)


class CompactTraining:
    """Compact training mode for the DynamicOps of ``model``, with ``optimizers`` whose state follows along.

    Args:
        model: a model prepared by ``ChannelMutator.prepare_from_supernet`` (or wrapped in DDP / DataParallel:
            the module inside is used).
        optimizers: the optimizers (one or a list) that step the model's parameters. Their per-parameter state
            follows the compaction: a state tensor shaped like the full parameter (SGD's ``momentum_buffer``,
            Adam / AdamW's ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``, any other optimizer's) is compacted
            with the same channels and the pruned channels' state is set aside until they are selected again;
            0-dim tensors (Adam's ``step``) and non-tensors are kept as they are. A state tensor of any other shape
            (e.g. a factored second moment) is refused with ConfigError. State created while compact is zero for
            the pruned channels when written back (what SGD and Adam hold for a channel that had no gradient).

    ``enter()`` (or ``with``) turns the mode on, ``exit()`` off; ``paused()`` gives full-size tensors for a block
    (change selections, rank channels, read full weights there); ``refresh()`` re-reads every selection.
    Selection changes that reach a compact op directly (``set_choices`` with units that do not read weights, a
    checkpoint load) are handled at the op: written back, then compact for the new selection.
    """

    def __init__(self, model: nn.Module, optimizers: Optimizers = None):
        self.model = unwrap_model(model)
        self.optimizers = _as_list(optimizers)
        self._ops: List[Tuple[str, DynamicChannelMixin]] = []
        self._state_aside: Dict[int, Dict[Tuple[int, str], Tensor]] = {}   # id(param) -> {(optimizer, key): full}
        self._held_params: Dict[int, str] = {}                              # id(compact tensor) -> its path
        self._checked_steps: Dict[int, int] = {}                            # id(optimizer) -> generation checked
        self._generation = 0
        self._handles: list = []
        self._pause_depth = 0
        self.active = False

    # ------------------------------------------------------------------------------------------------ on / off
    def enter(self) -> "CompactTraining":
        """Turn compact mode on: every op holds its current selection's compact tensors. Validated first (an
        unprepared model, a layer already in compact mode, optimizers that do not belong to the model or keep
        state of another shape raise ConfigError naming the layer); nothing changes on error."""
        if self.active:
            raise ConfigError("compact_training: this session is already on")
        ops, peers = self._compactable_ops()
        self._check_optimizers(ops)
        for name, op in ops:
            op.tensor_provider.install(CompactOpState(self, peers.get(name, ())))
            self._handles += [op.register_state_dict_post_hook(_full_state_dict_hook),
                              op.register_load_state_dict_pre_hook(_release_before_load),
                              op.register_load_state_dict_post_hook(_compact_after_load)]
        for optimizer in self.optimizers:
            self._handles += [optimizer.register_state_dict_post_hook(self._full_optimizer_state_dict),
                              optimizer.register_load_state_dict_post_hook(self._compact_loaded_optimizer_state)]
        self._ops, self.active = ops, True
        _activate(self)
        try:
            for _, op in ops:
                _state(op).compact(op)
        except Exception:
            self.exit()
            raise
        self._warn_disagreeing_peers()
        return self

    def exit(self) -> None:
        """Turn compact mode off: every value (parameters, running stats, gradients, optimizer state) written back
        into the full tensors, which are the parameters' data again."""
        if not self.active:
            return
        try:
            for _, op in self._ops:
                state = _state(op)
                if state is not None:
                    state.suspended = True
                    state.release(op)
        finally:
            for _, op in self._ops:
                if _state(op) is not None:
                    op.tensor_provider.install(None)
            for handle in self._handles:
                handle.remove()
            self._handles, self._ops, self._state_aside, self._held_params = [], [], {}, {}
            self.active = False
            _deactivate(self)

    def __enter__(self) -> "CompactTraining":
        return self if self.active else self.enter()

    def __exit__(self, *exc_info) -> None:
        self.exit()

    @contextlib.contextmanager
    def paused(self):
        """Full-size tensors (and gradients, and optimizer state) inside the block; on leaving it, every op holds
        its then-current selection's compact tensors. Change selections or rank channels here."""
        self._require_active("paused")
        self._pause_depth += 1
        try:
            if self._pause_depth == 1:
                for _, op in self._ops:
                    state = _state(op)
                    state.suspended = True
                    state.release(op)
            yield self
        finally:
            self._pause_depth -= 1
            if self._pause_depth == 0:
                self._compact_all()

    def refresh(self) -> None:
        """Write everything back and take every op's current selection again (e.g. after a selection was changed
        while an op could not follow, or after a failed load left ops full-size)."""
        self._require_active("refresh")
        with self.paused():
            pass

    def _compact_all(self) -> None:
        for _, op in self._ops:
            state = _state(op)
            state.suspended, state.loading = False, False
            state.compact(op)
        self._warn_disagreeing_peers()

    def _warn_disagreeing_peers(self) -> None:
        """Layers sharing a tensor compact only when they keep the same channels of it (a traced model's tied
        tensors always do); say which stay in gather mode because they do not (once per group of layers)."""
        names = {id(op): name for name, op in self._ops}
        reported = set()
        for name, op in self._ops:
            state = _state(op)
            if name in reported or not state.peers or op._holds_compact() or not op._compact_layout():
                continue
            peers = [names[id(peer)] for peer in state.peers]
            reported.update(peers)
            warnings.warn(f"compact_training: {name} shares tensors with {peers}, which keep other channels of "
                          f"them; these layers stay in gather mode", stacklevel=4)

    @property
    def layers(self) -> List[str]:
        """Names of the layers holding compact tensors right now."""
        return [name for name, op in self._ops if op._holds_compact()]

    @property
    def compact_parameters(self) -> int:
        """Elements of all compact tensors held (what the optimizer steps instead of the full ones)."""
        return sum(held.piece.tensor.numel() for _, op in self._ops for held in _state(op).held)

    def __repr__(self) -> str:
        state = f"on, {len(self.layers)} of {len(self._ops)} layers compact" if self.active else "off"
        return f"CompactTraining({type(self.model).__name__}, {len(self.optimizers)} optimizer(s), {state})"

    def _require_active(self, what: str) -> None:
        if not self.active:
            raise ConfigError(f"compact_training: {what}() needs the session to be on (enter() it first)")

    # ------------------------------------------------------------------------------------------------ validation
    def _compactable_ops(self) -> Tuple[List[Tuple[str, DynamicChannelMixin]], Dict[str, List[nn.Module]]]:
        """``(ops, peers)``: the ops that can train compact and, per op name, the ops it shares tensors with (tied
        weights: they compact together, see :mod:`.compact_state`)."""
        ops = [(name, m) for name, m in self.model.named_modules() if isinstance(m, DynamicChannelMixin)]
        if not ops:
            plain = next((f"{name!r} ({type(m).__name__})" for name, m in self.model.named_modules()
                          if any(isinstance(m, base) for base in DYNAMIC_OPS)), None)
            where = f"layer {plain} is a plain torch layer" if plain else \
                f"{type(self.model).__name__} has no layer pyprune prunes"
            raise ConfigError(f"compact_training: the model is not prepared for pruning ({where}); call "
                              f"ChannelMutator.prepare_from_supernet(model) first")
        for name, op in ops:
            if _state(op) is not None:
                raise ConfigError(f"compact_training: layer {name!r} ({type(op).__name__}) is already in compact "
                                  f"training mode (another session, or a deep copy made in compact mode: "
                                  f"pyprune.ops.compact.release_compact(model) releases a copy)")
        users: Dict[int, List[str]] = {}  # id(tensor) -> the layers using it
        for name, op in ops:
            for tensor in {id(t): t for t in op._source_tensors() if t is not None}.values():
                users.setdefault(id(tensor), []).append(name)
        slots: Dict[int, List[str]] = {}  # id(tensor) -> the channel parameters using it
        for slot in channel_parameters(self.model):
            slots.setdefault(id(slot.tensor), []).append(slot.pyprune_name)
        groups = _sharing_groups([name for name, _ in ops], users)
        by_name = dict(ops)

        def slots_of(names):
            return sorted({slot for member in names for t in by_name[member]._source_tensors() if t is not None
                           for slot in slots.get(id(t), ())})
        held = []
        for name, op in ops:
            # a ChannelParameter reads its tensor at full size (index_select): no compact copy may replace it, nor
            # one of a peer that compacts together with this op
            own, through_peers = slots_of([name]), slots_of(groups[name])
            if own:
                warnings.warn(f"compact_training: {name} shares tensors with {own}; it stays in gather mode",
                              stacklevel=4)
            elif through_peers:
                peers = [member for member in groups[name] if member != name]
                warnings.warn(f"compact_training: {name} shares tensors with {peers}, which share tensors with "
                              f"{through_peers}; it stays in gather mode", stacklevel=4)
            else:
                held.append((name, op))
        peers = {name: [by_name[member] for member in groups[name] if member != name] for name, _ in held}
        return held, {name: members for name, members in peers.items() if members}

    def _check_optimizers(self, ops) -> None:
        model_params = {id(p) for p in self.model.parameters()}
        names = [name for name, _ in self.model.named_parameters()]
        for number, optimizer in enumerate(self.optimizers):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if params and not any(id(p) in model_params for p in params):
                guess = f"; the model's parameter at that place is {names[0]!r}" if names else ""
                raise ConfigError(f"compact_training: optimizer {number} ({type(optimizer).__name__}) steps none of "
                                  f"the model's parameters (its first, shape {list(params[0].shape)}, is not the "
                                  f"model's{guess}): it was built before the model was re-prepared / rebuilt, or "
                                  f"for another model. Build it from model.parameters()")
        for name, op in ops:
            for tensor_name, tensor in zip(op._channel_tensors, op._source_tensors()):
                if tensor is not None:
                    self._check_states_of(f"{name}.{tensor_name}", tensor, tuple(tensor.shape))

    def _check_states_of(self, path: str, tensor: Tensor, full_shape: Tuple[int, ...]) -> None:
        for number, optimizer in enumerate(self.optimizers):
            for key, value in (optimizer.state.get(tensor) or {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) != full_shape:
                    raise ConfigError(f"compact_training: optimizer {number} ({type(optimizer).__name__}) keeps "
                                      f"state {key!r} of shape {list(value.shape)} for {path} {list(full_shape)}; "
                                      f"only state shaped like the parameter (or 0-dim) can follow a compaction")

    def _check_optimizer_states(self, op: DynamicChannelMixin, layout: Sequence[ChannelSlice]) -> None:
        for piece in layout:
            self._check_states_of(f"{op.pyprune_name}.{piece.name}", piece.tensor, tuple(piece.tensor.shape))

    # ---------------------------------------------------------------------------------------- optimizer state
    def _optimizer_states(self, tensor: Tensor):
        for number, optimizer in enumerate(self.optimizers):
            state = optimizer.state.get(tensor)
            if state:
                yield number, state

    def _compact_optimizer_state(self, piece: ChannelSlice, full_shape: torch.Size) -> None:
        """Called with ``piece.tensor`` still full-size: its optimizer state tensors become compact, the full ones
        are set aside."""
        aside = {}
        for number, state in self._optimizer_states(piece.tensor):
            for key, value in list(state.items()):
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape == full_shape:
                    aside[(number, key)] = value
                    state[key] = gather_slice(piece, value)
        if aside:
            self._state_aside[id(piece.tensor)] = aside

    def _release_optimizer_state(self, piece: ChannelSlice, compact_shape: torch.Size,
                                 full_shape: torch.Size) -> None:
        """Called with ``piece.tensor`` still compact: its compact optimizer state is written into the full state
        set aside (zeros where there is none) and swapped back in."""
        aside = self._state_aside.pop(id(piece.tensor), {})
        for number, state in self._optimizer_states(piece.tensor):
            for key, value in list(state.items()):
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape == compact_shape:
                    state[key] = self._written_state(aside.get((number, key)), value, piece, full_shape)

    @staticmethod
    def _written_state(full: Optional[Tensor], compact: Tensor, piece: ChannelSlice, full_shape) -> Tensor:
        if full is None or full.shape != full_shape or full.dtype != compact.dtype or full.device != compact.device:
            full = compact.new_zeros(full_shape)
        scatter_slice_(full, compact, piece)
        return full

    def _full_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict) -> None:
        """Optimizer state_dict post-hook: full-size state for compact parameters (as a gather-mode run saves)."""
        number = self.optimizers.index(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
        held = self._held_by_tensor()
        packed = {}
        for index, state in state_dict["state"].items():
            entry = held.get(id(params[index])) if index < len(params) else None
            if entry is None:
                packed[index] = state
                continue
            aside = self._state_aside.setdefault(id(entry.piece.tensor), {})
            compact_shape, full_shape = entry.piece.tensor.shape, entry.full.shape
            state = dict(state)
            for key, value in state.items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape == compact_shape:
                    with torch.no_grad():
                        aside[(number, key)] = self._written_state(aside.get((number, key)), value, entry.piece,
                                                                   full_shape)
                    state[key] = aside[(number, key)]
            packed[index] = state
        state_dict["state"] = packed

    def _compact_loaded_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``optimizer.load_state_dict``: loaded full-size state of compact parameters becomes compact (the
        loaded tensors are the new full state set aside)."""
        number = self.optimizers.index(optimizer)
        for entry in self._held_by_tensor().values():
            tensor = entry.piece.tensor
            state = optimizer.state.get(tensor)
            if not state:
                continue
            aside = self._state_aside.setdefault(id(tensor), {})
            for key, value in list(state.items()):
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape == entry.full.shape:
                    with torch.no_grad():
                        aside[(number, key)] = value
                        state[key] = gather_slice(entry.piece, value)

    def _held_by_tensor(self) -> Dict[int, HeldTensor]:
        return {id(held.piece.tensor): held for _, op in self._ops for held in _state(op).held}

    # ------------------------------------------------------------------------------------------- step checks
    def _held_changed(self, op: DynamicChannelMixin, held: Iterable[HeldTensor],
                      released: Iterable[HeldTensor] = ()) -> None:
        for entry in released:
            self._held_params.pop(id(entry.piece.tensor), None)
        for entry in held:
            self._held_params[id(entry.piece.tensor)] = f"{op.pyprune_name}.{entry.name}"
        self._generation += 1

    def _check_step(self, optimizer: torch.optim.Optimizer) -> None:
        if any(optimizer is known for known in self.optimizers):
            return
        if self._checked_steps.get(id(optimizer)) == self._generation:
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                path = self._held_params.get(id(param))
                if path is not None:
                    raise ConfigError(f"{type(optimizer).__name__}.step(): parameter {path} is in compact training "
                                      f"mode, but this optimizer was not given to compact_training(model, "
                                      f"optimizers=...), so its state cannot follow the selection; pass it there "
                                      f"(nothing was stepped)")
        self._checked_steps[id(optimizer)] = self._generation


def _sharing_groups(names: List[str], users: Dict[int, List[str]]) -> Dict[str, List[str]]:
    """Per op name, the names of the ops linked to it through shared tensors (itself included, transitively: a
    tensor shared by ``a`` and ``b`` and another by ``b`` and ``c`` make one group), in model order."""
    group_of = {name: [name] for name in names}
    for sharing in users.values():
        merged = sorted({member for user in sharing for member in group_of[user]}, key=names.index)
        for member in merged:
            group_of[member] = merged
    return group_of


def _activate(session: CompactTraining) -> None:
    global _STEP_HOOK
    _ACTIVE.add(session)
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_pre_hook(_check_optimizer_step)


def _deactivate(session: CompactTraining) -> None:
    global _STEP_HOOK
    _ACTIVE.discard(session)
    if not _ACTIVE and _STEP_HOOK is not None:
        _STEP_HOOK.remove()
        _STEP_HOOK = None


def compact_training(model: nn.Module, optimizers: Optimizers = None) -> CompactTraining:
    """Turn compact training mode on for ``model`` (see :class:`CompactTraining`) and return the session; use it
    as a context manager (``with compact_training(model, optimizer):``) or call ``.exit()`` when done."""
    return CompactTraining(model, optimizers).enter()
