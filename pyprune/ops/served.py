"""Layers with their own forward: a subclass of a known layer kind whose ``forward`` pyprune does not own.

timm's ``BatchNormAct2d`` (batch norm, then drop and activation, in its own ``forward``), ``GroupNormAct``,
``LayerNormAct2d``, ``LayerNorm2d``, ``ScaledStdConv2d`` / ``StdConv2d`` (weight standardisation inside
``forward``), ``Conv2dSame``, and the same pattern in anyone's code, subclass ``nn.BatchNorm2d`` / ``nn.Conv2d`` /
... and override ``forward``. Swapping that forward for ours would lose what it adds; so instead the layer keeps its
own ``forward``, and while it runs the module's channel tensors and width attributes *are* the active ones:

* its channel tensors (the kind's ``_channel_tensors`` plus any other parameter / buffer of the module whose dim 0
  is the output channels, e.g. ``ScaledStdConv2d.gain`` ``[C_out, 1, 1, 1]``) are read through the op's tensor
  provider (gather, eval cache, compact training mode, batched hand-off: the same tensors a DynamicOp computes
  with) and put in front of the parameters as instance attributes for the duration of the call;
* its width attributes (``num_features``, ``out_channels`` / ``in_channels`` / ``groups``, ``normalized_shape``,
  ...: the kind's :meth:`active_attributes`) hold the active values;
* whatever the forward writes into its buffers in training (running statistics) is carried into the kept channels
  of the full buffers afterwards.

Whether a layer can be served is decided once per module by a probe (:func:`serving_probe`): the served forward
must run at a reduced selection, give the output shape the kind predicts, and, where the kind's outputs are
channel-wise (batch norm; conv / linear with only outputs pruned), the values of the full forward at the kept
channels; a kind may add a check of its own (``probe_check``: the structurally recognised channel norms of
:mod:`pyprune.ops.channel_norm` must follow a permutation of their channels and normalise). A layer that fails is
not converted: the tracer fixes its channel groups with a warning naming the class and the reason. The probe runs
on a copy without the module's hooks, outside any torch function mode (a recorded forward may be running), and on
the CPU with random values for a module on the meta device.

``export()`` returns the layer's own class (not a pyprune type) holding compact copies of its tensors and the
active width attributes, its submodules copied.
"""
import copy
import weakref
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import DynamicChannelMixin
from .compact_state import ChannelSlice

__all__ = ["ServedForward", "ServingProbe", "serving_probe", "served_class", "has_own_forward"]


class ServingProbe(NamedTuple):
    """What the probe of one module found: ``channel_dim`` of its input / output (None when it cannot be served)
    and ``reason`` (why not; empty when it can)."""
    channel_dim: Optional[int]
    reason: str

    @property
    def ok(self) -> bool:
        return self.channel_dim is not None


_PROBES: "weakref.WeakKeyDictionary[nn.Module, ServingProbe]" = weakref.WeakKeyDictionary()
_SERVED_CLASSES: Dict[type, type] = {}
_META_PROBES: Dict[tuple, ServingProbe] = {}  # by _meta_signature: meta modules alike probe once


def has_own_forward(module: nn.Module, base: type) -> bool:
    """Whether ``module``'s class overrides the ``forward`` of its registered layer type ``base``."""
    return type(module).forward is not base.forward


def served_class(own_type: type, kind: type) -> type:
    """The served DynamicOp class for layers of ``own_type`` (a subclass of a listed torch layer type) with the
    layer-kind class ``kind`` (its DynamicOp class); made once per type."""
    served = _SERVED_CLASSES.get(own_type)
    if served is None:
        served = type(f"Served{own_type.__name__}", (ServedForward, kind, own_type),
                      {"_torch_type": own_type, "_own_type": own_type, "__module__": __name__})
        _SERVED_CLASSES[own_type] = served
    return served


class ServedForward:
    """Mixed in front of a layer kind's DynamicOp class and the layer's own class (see the module docstring)."""

    _own_type: type = nn.Module

    @classmethod
    def convert_from(cls, module: nn.Module) -> "ServedForward":
        probe = serving_probe(module)
        if not probe.ok:
            raise ConfigError(f"{type(module).__name__}: its own forward cannot run at a reduced width "
                              f"({probe.reason})")
        return cls._served_from(module, probe.channel_dim)

    @classmethod
    def _served_from(cls, module: nn.Module, channel_dim: int) -> "ServedForward":
        own_keys = tuple(module.__dict__)
        op = DynamicChannelMixin.convert_from.__func__(cls, module)  # the generic conversion, not the kind's
        extras = _per_channel_extras(module, cls)
        op.__dict__.update(_own_keys=own_keys, _served_dim=channel_dim, _served_extras=extras,
                           _channel_tensors=cls._channel_tensors + extras)
        return op

    # ------------------------------------------------------------------------------------------------- forward
    def _channel_dims(self, x: Tensor) -> Tuple[int, str]:
        dim = self.__dict__["_served_dim"]
        return (dim if dim >= 0 else x.dim() + dim), "channels"

    def forward(self, *args, **kwargs):
        x = next((a for a in args if isinstance(a, Tensor)), None)
        if x is not None:
            self._check_input(x)
        names = self._channel_tensors
        tensors = self.active_tensors(x)
        replaced = self.lend_active_state(tensors)
        try:
            output = self._own_type.forward(self, *args, **kwargs)
        finally:
            self.restore_lent_state(replaced)
        if self.training:
            buffers = self._buffers
            self.carry_writes({name: t for name, t in zip(names, tensors) if name in buffers})
        return output

    def _compact_layout(self) -> List[ChannelSlice]:
        """The kind's slices, plus the per-output-channel extras (rows only)."""
        extras = self.__dict__["_served_extras"]
        layout = [piece for piece in super()._compact_layout() if piece.name not in extras]
        rows = self._kernel_indices()[0]
        if rows is not None:
            sources = dict(zip(self._channel_tensors, self._source_tensors()))
            layout += [ChannelSlice(name, sources[name], rows) for name in extras if sources[name] is not None]
        return layout

    # -------------------------------------------------------------------------------------------------- export
    def export(self) -> nn.Module:
        """An instance of the layer's own class with compact copies of its channel tensors, copies of its other
        tensors and submodules, and the active width attributes; in the same train / eval mode."""
        static = self._own_type.__new__(self._own_type)
        state = self.__dict__
        for key in state["_own_keys"]:
            value = state[key]
            static.__dict__[key] = copy.copy(value) if isinstance(value, dict) else value
        compact = dict(zip(self._channel_tensors, self.tensor_provider.tensors_to_export(self)))
        with torch.no_grad():
            for name, parameter in self._parameters.items():
                if parameter is not None:
                    data = compact.get(name, parameter).detach().clone()
                    static._parameters[name] = nn.Parameter(data, requires_grad=parameter.requires_grad)
            for name, buffer in self._buffers.items():
                if buffer is not None:
                    static._buffers[name] = compact.get(name, buffer).detach().clone()
        static._modules = {name: copy.deepcopy(child) for name, child in self._modules.items()}
        static.__dict__.update(self.active_attributes())
        return static.train(self.training)


def _per_channel_extras(module: nn.Module, kind: type) -> Tuple[str, ...]:
    """Names of ``module``'s own parameters / buffers besides the kind's channel tensors whose dim 0 is the output
    channels (read at the kept output channels)."""
    out_channels = kind.channel_counts(module)[0]
    names = []
    for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
        if name in kind._channel_tensors or tensor is None:
            continue
        if tensor.dim() >= 1 and tensor.shape[0] == out_channels:
            names.append(name)
    return tuple(names)


# ------------------------------------------------------------------------------------------------------- probe
def serving_probe(module: nn.Module, kind: Optional[type] = None) -> ServingProbe:
    """Whether ``module`` (a layer with its own forward) can be served, and on which channel dim; probed once per
    module on a copy (the module itself, its statistics and its random state are not touched). ``kind``: the layer
    kind to probe it as (default: ``layer_kind(module)``; the registry passes the kind a structural test found)."""
    probe = _PROBES.get(module)
    if probe is None:
        signature = _meta_signature(module, kind)
        probe = _META_PROBES.get(signature) if signature is not None else None
        if probe is None:
            with torch._C.DisableTorchFunction():  # a recorder's TorchFunctionMode must not see the probe's calls
                probe = _probe(module, kind)
            if signature is not None:
                _META_PROBES[signature] = probe
        _PROBES[module] = probe
    return probe


def _meta_signature(module: nn.Module, kind: Optional[type]) -> Optional[tuple]:
    """What the probe of a module on the meta device depends on: its class, the kind, its tensors' names, shapes
    and dtypes, its plain attributes (``eps``, widths) and its submodules' classes; the probe fills a meta
    module's copy with random values, so two modules alike in all of these get the same result (an 8B model's 65
    RMSNorms probe once). None for a module with real tensors (its values are probed) or unhashable attributes."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    if not tensors or not all(t.is_meta for _, t in tensors):
        return None
    attributes = tuple((k, v) for k, v in module.__dict__.items() if not k.startswith("_") and
                       (v is None or isinstance(v, (bool, int, float, str, tuple, torch.Size))))
    try:
        signature = (type(module), kind, tuple((n, tuple(t.shape), t.dtype) for n, t in tensors), attributes,
                     tuple(type(m) for m in module.modules()))
        hash(signature)
    except TypeError:  # a tuple attribute holding something unhashable
        return None
    return signature


def _probe(module: nn.Module, kind: Optional[type]) -> ServingProbe:
    if kind is None:
        from .registry import layer_kind  # the registry lists this module's classes
        kind = layer_kind(module)
    if kind is None or not kind.probe_inputs(module):  # [] for kinds that take no single input (attention)
        return ServingProbe(None, "its layer kind has no probe input")
    if not kind.can_convert(module):
        return ServingProbe(None, "its layer kind cannot take this configuration")
    reasons = []
    for shape, dim in kind.probe_inputs(module):
        reason = _try_dim(module, kind, shape, dim)
        if reason is None:
            return ServingProbe(dim, "")
        reasons.append(reason)
    return ServingProbe(None, "; ".join(dict.fromkeys(reasons)))


def _try_dim(module: nn.Module, kind: type, shape: Tuple[int, ...], dim: int) -> Optional[str]:
    """None when the served forward of ``module`` with channels on ``dim`` of inputs ``shape`` behaves, else why."""
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            copied = _probe_copy(module)
            parameter = next(iter(copied.parameters()), None)
            options = {} if parameter is None else {"device": parameter.device, "dtype": parameter.dtype}
            make_input = getattr(kind, "probe_input", None)  # a kind whose input is not channels (token ids)
            x = make_input(copied, shape) if make_input is not None else torch.randn(shape, **options)
            full = copied(x)
            if not isinstance(full, Tensor):
                return f"its forward returns {type(full).__name__}, not a tensor"
            op = served_class(type(module), kind)._served_from(copied, dim)
            reason = _check_reduced(op, kind, x, full, dim)
            check = getattr(kind, "probe_check", None)
            return reason if reason is not None or check is None else check(op, x, dim)
    except Exception as error:  # whatever the module's own code raises: it cannot be served
        return f"{type(error).__name__} at a reduced width: {str(error).splitlines()[0][:160] if str(error) else ''}"


def _probe_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode without forward hooks (a recorder's hooks would see it); on the CPU
    with random values (norm-like: around 1) where ``module`` lives on the meta device."""
    copied = copy.deepcopy(module).eval()
    for part in copied.modules():
        part._forward_hooks.clear()
        part._forward_pre_hooks.clear()
    tensors = list(copied.parameters()) + list(copied.buffers())
    if any(t.is_meta for t in tensors):
        copied = copied.to_empty(device="cpu")
        for tensor in list(copied.parameters()) + list(copied.buffers()):
            if tensor.is_floating_point():
                tensor.data.uniform_(0.5, 1.5)
            else:
                tensor.data.zero_()
    return copied


def _check_reduced(op: "ServedForward", kind: type, x: Tensor, full: Tensor, dim: int) -> Optional[str]:
    out_channels, in_channels = kind.channel_counts(op)
    in_dim = dim % x.dim()
    out_dim = dim % full.dim()
    shared = kind.shares_selection(op)
    out_keep = _reduced_index(out_channels, kind.selection_groups(op), x.device)
    op.set_out_index(out_keep)
    if not shared:  # outputs only first: channel-wise kinds must then give the full outputs at the kept channels
        got = op(x)
        reason = _compare(got, full, out_keep, out_dim, exact=True)
        if reason or getattr(kind, "probe_outputs_only", False):  # an embedding's input (ids) has no channels
            return reason
        in_keep = _reduced_index(in_channels, kind.selection_groups(op), x.device)
        op.set_in_index(in_keep)
    else:
        in_keep = out_keep
    got = op(x.index_select(in_dim, in_keep))
    return _compare(got, full, out_keep, out_dim, exact=shared and kind.channelwise(op))


def _compare(got, full: Tensor, keep: Tensor, dim: int, exact: bool) -> Optional[str]:
    if not isinstance(got, Tensor):
        return f"at a reduced width its forward returns {type(got).__name__}"
    expected = full.index_select(dim, keep)
    if got.shape != expected.shape:
        return f"at a reduced width its output has shape {list(got.shape)}, expected {list(expected.shape)}"
    if exact and not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        return "at a reduced width its outputs differ from the full layer's at the kept channels"
    return None


def _reduced_index(channels: int, groups: int, device) -> Tensor:
    """All channels but the last of each of ``groups`` blocks (all of them when a block has one channel)."""
    block = channels // groups
    keep = torch.arange(channels, device=device).reshape(groups, block)
    return (keep[:, :-1] if block > 1 else keep).reshape(-1)
