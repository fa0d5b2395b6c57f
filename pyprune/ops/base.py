"""DynamicChannelMixin: the channel selection state every DynamicOp carries, and what it shares.

A DynamicOp is a subclass of the torch layer it replaces (``DynamicConv2d(DynamicChannelMixin, nn.Conv2d)``) that
holds the same full-size parameters and computes with only the selected ("active") channels:

* ``out_index`` / ``in_index``: sorted, unique int64 ``[K]`` on the layer's device, or ``None`` = every channel;
* ``active_out_channels`` / ``active_in_channels``: ``K`` as a Python int (read without a device sync);
* a version number, bumped on every change (keys the eval-mode compact-weight cache).

The input of ``forward`` already has only the active input channels (as in mmrazor): a conv pruned to 3 of 8 input
channels takes ``x`` ``[N, 3, H, W]``. Selections come in through two doors: the validated public
``set_out_channels`` / ``set_in_channels`` (ratio, count, mask or indices; may sync) and the trusted
``set_out_index`` / ``set_in_index`` units use (no validation, no sync). In a prepared model the op's indices
are derived: its units own the selection and push it through the trusted door, and the model's state_dict saves
it per unit (``pyprune.mutators.selection_hooks``); an op saves no selection of its own.
"""
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import kernels
from ..errors import ChannelSelectionError, ConfigError
from .compact_state import ChannelSlice, gather_slice
from .cost_terms import Bilinear, CostTerms, parameter_counts, per_channel_parameters
from .layer_kind import LayerKind, OneSelectionKind
from .mutable_attrs import MutableAttrs
from .provider import TensorProvider
from .selection import choice_to_index

__all__ = ["DynamicChannelMixin"]



_NOT_SET = object()  # an instance attribute that was absent before an op lent its active state


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast computes in for ``x``'s device type, or None when autocast is off there."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast_eligible(tensor: Tensor) -> bool:
    """Whether autocast would cast ``tensor`` to its lower-precision dtype (floating, not float64)."""
    return tensor.is_floating_point() and tensor.dtype != torch.float64


class DynamicChannelMixin(LayerKind, MutableAttrs):
    """Channel selection state, validation, the eval cache and export plumbing.

    Subclasses set ``_torch_type`` (the plain layer ``export`` builds), ``_channel_tensors`` (names of the
    per-channel parameters / buffers gathered for forward, in the order ``active_tensors(x)`` returns them),
    implement ``forward``, ``_channel_dims`` (or ``_check_input``) and ``_static_module`` (or ``export``), and answer
    the layer-kind facts of :class:`~pyprune.ops.layer_kind.LayerKind` (``channel_counts``, ``cost_terms`` and
    ``probe_inputs`` always; the others where the common answer does not fit): each DynamicOp class is the one
    place that knows its layer type. Registering it (``pyprune.ops.DYNAMIC_OPS``) checks all of that.
    """

    _torch_type: type = nn.Module
    _channel_tensors: Tuple[str, ...] = ("weight", "bias")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_selection()

    @classmethod
    def convert_from(cls, module: nn.Module) -> "DynamicChannelMixin":
        """A ``cls`` sharing ``module``'s Parameter / buffer objects, hooks and settings; every channel active.

        ``module`` is left untouched (the new op has its own registries, so swapping it into a model does not
        change the old module).
        """
        if not isinstance(module, cls._torch_type):
            raise ConfigError(f"{cls.__name__}.convert_from: expected an nn.{cls._torch_type.__name__} (or a "
                              f"subclass), got {type(module).__name__}")
        cls._check_convertible(module)
        op = cls.__new__(cls)
        for key, value in module.__dict__.items():
            object.__setattr__(op, key, copy.copy(value) if isinstance(value, dict) else value)
        op._init_selection()
        return op

    @classmethod
    def _check_convertible(cls, module: nn.Module) -> None:
        """Raise ConfigError when ``module`` has a configuration this op cannot run (e.g. LayerNorm over 2 dims)."""

    @classmethod
    def can_convert(cls, module: nn.Module) -> bool:
        try:
            cls._check_convertible(module)
        except ConfigError:
            return False
        return True

    def _init_selection(self) -> None:
        full_out, full_in = self._full_channels()
        self._out_index: Optional[Tensor] = None
        self._in_index: Optional[Tensor] = None
        self._active_out, self._active_in = full_out, full_in
        self._selection_version = 0
        self.__dict__["_provider"] = TensorProvider()  # a plain attribute, not a submodule
        self._after_selection_change()

    # ------------------------------------------------------------------------------------------- what subclasses say
    def _channel_dims(self, x: Tensor) -> Tuple[int, str]:
        """(dim of ``x`` that holds the input channels, a word for the error message)."""
        raise NotImplementedError

    def _static_module(self) -> nn.Module:
        """The plain ``_torch_type`` layer with the active channel counts, built on the meta device."""
        raise NotImplementedError

    def _full_channels(self) -> Tuple[int, int]:
        """(output channels, input channels) of the full layer."""
        return type(self).channel_counts(self)

    def _one_selection(self) -> bool:
        return type(self).shares_selection(self)

    def _groups_of(self, is_output: bool) -> int:
        """Number of equal channel blocks a selection of that side must keep balanced (1 = no constraint)."""
        return type(self).selection_groups(self)

    def _kernel_indices(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(out index, in index) as ``gather_channels`` takes them for the weight."""
        return self._out_index, self._in_index

    def _after_selection_change(self) -> None:
        """Derive whatever the op computes from the selection (e.g. a grouped conv's per-group in index)."""

    # ----------------------------------------------------------------------------------------------- selection state
    @property
    def pyprune_name(self) -> str:
        """The layer's name in error messages: its module path when the mutator set it, else the class name."""
        return self.__dict__.get("_pyprune_name") or type(self).__name__

    @pyprune_name.setter
    def pyprune_name(self, name: str) -> None:
        self.__dict__["_pyprune_name"] = name

    @property
    def out_index(self) -> Optional[Tensor]:
        return self._out_index

    @property
    def in_index(self) -> Optional[Tensor]:
        """Global input channel index (a grouped conv keeps its per-group local form to itself)."""
        return self._out_index if self._one_selection() else self._in_index

    @property
    def active_out_channels(self) -> int:
        return self._active_out

    @property
    def active_in_channels(self) -> int:
        return self._active_out if self._one_selection() else self._active_in

    @property
    def selection_version(self) -> int:
        return self._selection_version

    def set_out_index(self, index: Optional[Tensor]) -> None:
        """Trusted: select output channels by a sorted, unique int64 global ``index`` on the layer's device, or
        ``None`` for all. Not validated and never synchronises (units guarantee the index is sound)."""
        self._set_index(index, True)

    def set_in_index(self, index: Optional[Tensor]) -> None:
        """Trusted: as :meth:`set_out_index`, for the input channels (the same selection on single-selection ops)."""
        self._set_index(index, False)

    def _set_index(self, index: Optional[Tensor], is_output: bool) -> None:
        is_output = is_output or self._one_selection()
        full = self._full_count(is_output)
        if index is not None and index.shape[0] == full:
            index = None  # a sorted unique in-range index of full length can only be arange: skip the gathers
        self._check_group_count(index, is_output)
        count = full if index is None else index.shape[0]
        state = self.__dict__  # plain attributes: skip nn.Module.__setattr__'s checks (runs per layer per switch)
        if is_output:
            state["_out_index"], state["_active_out"] = index, count
        else:
            state["_in_index"], state["_active_in"] = index, count
        self._selection_changed()

    def _full_count(self, is_output: bool) -> int:
        """Full channel count of a side (single-selection ops have only the output side)."""
        return self._full_channels()[0 if is_output or self._one_selection() else 1]

    def set_out_channels(self, choice) -> None:
        """Validated: keep the output channels ``choice`` names (ratio float in (0, 1], count int, bool mask
        ``[C_out]`` or indices). Bad input raises ChannelSelectionError naming the layer; nothing changes."""
        self.set_out_index(self._choice_to_index(choice, True))

    def set_in_channels(self, choice) -> None:
        """Validated: as :meth:`set_out_channels`, for the input channels."""
        self.set_in_index(self._choice_to_index(choice, False))

    def _choice_to_index(self, choice, is_output: bool) -> Optional[Tensor]:
        return choice_to_index(choice, self._full_count(is_output), self._groups_of(is_output), self._device(),
                               self._where(is_output))

    def _check_group_count(self, index: Optional[Tensor], is_output: bool) -> None:
        """The static half of the balance rule (a shape check, no sync); units guarantee the rest."""
        groups = self._groups_of(is_output)
        if index is not None and index.shape[0] % groups:
            raise ChannelSelectionError(f"{self._where(is_output)}: {index.shape[0]} channels cannot be split "
                                        f"evenly over the layer's {groups} groups")

    def _selection_changed(self) -> None:
        state = self.__dict__  # as in _set_index
        state["_selection_version"] += 1
        self._after_selection_change()
        state["_provider"].selection_changed(self)  # drops what was gathered for the old selection

    def _where(self, is_output: bool) -> str:
        side = "" if self._one_selection() else (" output channels" if is_output else " input channels")
        return f"{self.pyprune_name} ({type(self).__name__}){side}"

    def _device(self) -> Optional[torch.device]:
        """Where indices must live: the device of the layer's tensors (None when it holds none)."""
        for tensor in self._parameters.values():
            if tensor is not None:
                return tensor.device
        for tensor in self._buffers.values():
            if tensor is not None:
                return tensor.device
        return None

    # -------------------------------------------------------------------------------------------------- forward help
    def _check_input(self, x: Tensor) -> None:
        """Static shape check (no sync): the input must carry exactly the active input channels."""
        dim, word = self._channel_dims(x)
        if x.shape[dim] != self.active_in_channels:
            raise ChannelSelectionError(
                f"{self.pyprune_name} ({type(self).__name__}): input has {x.shape[dim]} {word} (dim {dim}), but the "
                f"layer's active input channels are {self.active_in_channels} of {self._full_channels()[1]}")

    def active_tensors(self, x: Optional[Tensor] = None) -> Tuple[Optional[Tensor], ...]:
        """The ``_channel_tensors`` at the active width, for input ``x``: what every forward computes with.

        Answered by the op's :class:`~pyprune.ops.provider.TensorProvider` (a batched hand-off, the held tensors of
        compact training mode, or a gather served from the eval cache); the forward does not need to know which.
        ``x`` lets conv / linear ops have them gathered in the autocast dtype / channels_last layout
        (:meth:`_gather_form`)."""
        return self.__dict__["_provider"].tensors(self, x)

    def carry_writes(self, written: Dict[str, Optional[Tensor]]) -> None:
        """A forward wrote into these tensors of :meth:`active_tensors` in place (``F.batch_norm``'s running
        statistics): carry the values into the full tensors where they were gathered copies."""
        self.__dict__["_provider"].carry_writes(self, written)

    @property
    def tensor_provider(self) -> TensorProvider:
        """The object :meth:`active_tensors` asks (compact training and the batched gather install into it)."""
        return self.__dict__["_provider"]

    def _gather_compact(self, form=None) -> Tuple[Optional[Tensor], ...]:
        """Fresh compact copies of ``_channel_tensors``: each slice of :meth:`_compact_layout` gathered, the other
        tensors (nothing pruned in them) returned as they are.

        ``form``: (dtype, memory format) to write them in, in the gather's one pass (see :meth:`_gather_form`);
        the dtype applies to autocast-eligible tensors, the memory format to tensors of its rank (the conv weight).
        """
        slices = self.__dict__["_provider"].slices(self)  # the layout, built once per selection
        dtype, memory_format = form if form is not None else (None, None)
        rank = {torch.channels_last: 4, torch.channels_last_3d: 5}.get(memory_format)
        compact = []
        for name, tensor in zip(self._channel_tensors, self._source_tensors()):
            piece = slices.get(name)
            if piece is None:
                compact.append(tensor)
            elif form is None:
                compact.append(gather_slice(piece, tensor))
            else:
                compact.append(gather_slice(piece, tensor, dtype if _autocast_eligible(tensor) else None,
                                            memory_format if tensor.dim() == rank else None))
        return tuple(compact)

    def _gather_form(self, x: Tensor) -> Optional[Tuple[Optional[torch.dtype], Optional[torch.memory_format]]]:
        """The (dtype, memory format) this op's compact tensors should be gathered in for input ``x``, or None for
        the plain form: the autocast dtype when autocast is on for ``x``'s device (so autocast finds them already
        cast: no separate cast kernel), and ``x``'s channels_last layout for a conv. Subclasses opt in."""
        return None

    def _source_tensors(self) -> List[Optional[Tensor]]:
        """The full tensors the gather reads, in ``_channel_tensors`` order (keys the eval cache)."""
        params, buffers = self._parameters, self._buffers  # plain dict reads: nn.Module.__getattr__ is slow
        return [params[name] if name in params else buffers.get(name) for name in self._channel_tensors]

    def clear_cache(self) -> None:
        """Drop the eval-mode compact-weight cache (needed only after writing weights through ``.data``)."""
        self.__dict__["_provider"].clear_cache()

    def held_tensors(self) -> List[Tensor]:
        """Every tensor the op holds besides its parameters and buffers (indices, derived indices, cached compact
        copies): what a captured CUDA graph reads at fixed addresses and must keep alive."""
        held = []
        for value in self.__dict__.values():
            values = value if isinstance(value, (tuple, list)) else (value,)
            held += [v for v in values if isinstance(v, Tensor)]
        return held + self.__dict__["_provider"].held_device_tensors()

    def lend_active_state(self, tensors: Sequence[Optional[Tensor]]) -> Dict[str, object]:
        """Make ``tensors`` (:meth:`active_tensors`, in ``_channel_tensors`` order) and :meth:`active_attributes`
        instance attributes, found before ``nn.Module.__getattr__`` looks in ``_parameters`` / ``_buffers``: what
        code that reads ``self.weight`` / ``self.out_features`` directly (a layer's own forward, an enclosing
        module's) sees at the active width. Returns what they replaced, for :meth:`restore_lent_state`."""
        values = dict(zip(self._channel_tensors, tensors))
        values.update(self.active_attributes())
        state = self.__dict__
        replaced = {name: state.get(name, _NOT_SET) for name in values}
        state.update(values)
        return replaced

    def restore_lent_state(self, replaced: Dict[str, object]) -> None:
        """Undo :meth:`lend_active_state`: each attribute as it was (absent again where it was absent)."""
        state = self.__dict__
        for name, value in replaced.items():
            if value is _NOT_SET:
                state.pop(name, None)
            else:
                state[name] = value

    def supernet_only_parameters(self) -> List[nn.Parameter]:
        """Parameters the op holds that no export keeps (a switchable BN's per-width sets other than the active
        one): what a count of the exported model's parameters leaves out. Default: none."""
        return []

    def _compact_layout(self) -> List[ChannelSlice]:
        """Each pruned channel tensor and the channels its compact copy keeps (tensors kept whole are left out):
        the one description of the slices, from which the gather, compact training mode and the batched gather
        all work. Ops whose tensors are not sliced as (out index rows, in index columns) override it."""
        out_index, in_index = self._kernel_indices()
        if out_index is None and in_index is None:
            return []
        layout = []
        for name, tensor in zip(self._channel_tensors, self._source_tensors()):
            cols = in_index if tensor is not None and tensor.dim() > 1 else None
            if tensor is not None and (out_index is not None or cols is not None):
                layout.append(ChannelSlice(name, tensor, out_index, cols))
        return layout

    @staticmethod
    def full_tensor(module: nn.Module, name: str) -> Optional[Tensor]:
        """``module``'s parameter / buffer ``name`` at full size (detached): in compact training mode the full data
        with the current compact values written back (in place, no sync), otherwise the tensor itself."""
        provider = module.__dict__.get("_provider")
        if provider is not None:
            return provider.full_tensor(module, name)
        tensor = getattr(module, name)
        return None if tensor is None else tensor.detach()

    def _holds_compact(self) -> bool:
        """Whether the op's channel tensors are the compact ones right now (compact training mode)."""
        return self.__dict__["_provider"].holds(self)

    def _apply(self, fn, *args, **kwargs):
        """Keep the indices on the layer's device through ``.to()`` / ``.cuda()`` / ``.half()`` ..."""
        provider = self.__dict__["_provider"]
        compact = provider.source if provider.holds(self) else None
        if compact is not None:  # compact mode: convert the full tensors, then take the compact copies again
            compact.release(self, with_optimizer=False)
        result = super()._apply(fn, *args, **kwargs)
        self._out_index = self._moved(self._out_index, fn)
        self._in_index = self._moved(self._in_index, fn)
        provider.clear_cache()
        self._after_selection_change()
        if compact is not None:
            compact.compact(self, with_optimizer=False)
        return result

    def _moved(self, index: Optional[Tensor], fn) -> Optional[Tensor]:
        if index is None:
            return None
        device = self._device()
        if device is None:
            moved = fn(index)
            device = moved.device if isinstance(moved, Tensor) else index.device
        return index if index.device == device else index.to(device)

    # ------------------------------------------------------------------------------------------------------- export
    def export(self) -> nn.Module:
        """The plain torch layer (exact type ``_torch_type``) with compact copies of every parameter and buffer
        and the active channel counts; in the same train / eval mode. The DynamicOp is left unchanged."""
        with torch.no_grad():
            state = {name: t for name, t in zip(self._channel_tensors, self._provider.tensors_to_export(self))
                     if t is not None}
            for name, tensor in list(self._parameters.items()) + list(self._buffers.items()):
                if tensor is None:
                    continue
                if name not in state:
                    state[name] = tensor
                if state[name] is tensor:  # unpruned or channel-free (num_batches_tracked): copy it all the same
                    state[name] = tensor.detach().clone()
        static = self._static_module()
        static.load_state_dict(state, assign=True)
        for name, parameter in self._parameters.items():
            if parameter is not None:
                getattr(static, name).requires_grad_(parameter.requires_grad)
        return static.train(self.training)

    def _bias_kwargs(self) -> Dict[str, bool]:
        """``bias=False`` for a norm with an affine weight but no bias (the keyword only exists in newer torch)."""
        return {"bias": False} if self.weight is not None and self.bias is None else {}

    def to_static_op(self) -> nn.Module:
        """Alias of :meth:`export` (mmrazor's name)."""
        return self.export()

    # No get_extra_state: an op's state_dict holds its full tensors only (same keys as the plain layer). The
    # selection is the units' and is saved per unit by the mutator's model (pyprune.mutators.selection_hooks).
    def extra_repr(self) -> str:
        active = f"active_out={self.active_out_channels}"
        if not self._one_selection():
            active = f"active_in={self.active_in_channels}, {active}"
        return f"{super().extra_repr()}, {active}"


class NormLayerKind(OneSelectionKind):
    """Layer-kind answers every norm layer shares (mixed in before :class:`DynamicChannelMixin`): one channel dim,
    so in and out are one selection; the affine scale ``[C]`` ranks channels (network slimming); no FLOPs (what
    ``FlopCounterMode`` counts), and per channel its ``[C]`` parameters (weight, bias, a served layer's extras)."""

    @classmethod
    def norm_scale(cls, module: nn.Module) -> Optional[Tensor]:
        return cls.full_tensor(module, "weight")

    @classmethod
    def cost_terms(cls, module: nn.Module, calls) -> CostTerms:
        counts = per_channel_parameters(module, cls.channel_counts(module)[0])
        return CostTerms(Bilinear(), parameter_counts(module, counts))

