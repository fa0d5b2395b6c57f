"""Which DynamicOp replaces which torch layer, and the one lookup every package asks about a layer's kind.

A layer's *kind* is the class that knows the facts about its type (:class:`~pyprune.ops.layer_kind.LayerKind`:
channel counts, selection constraints, importance rows, norm scale, probe inputs, cost terms, ...): its DynamicOp
class for torch layers, :class:`ChannelParameter` for channel-sized tensors. Units, the mutator, the tracer and the
budget ask :func:`layer_kind` instead of testing torch types themselves, so adding a layer type is one DynamicOp
class and one entry in :data:`DYNAMIC_OPS` (or :func:`register_layer_kind`); the table checks each entry as it is
added (``pyprune.ops.kind_table``), so an incomplete class is refused there with a TypeError naming what it lacks.

Two kinds of entries besides torch types known at import:

* **optional libraries** too slow to import with pyprune (transformers takes seconds): :data:`OPTIONAL_OPS` names
  the pyprune module listing their DynamicOps (``LAYER_OPS``), merged into :data:`DYNAMIC_OPS` at the first lookup
  after the library's module is imported (a model holding such a layer has imported it). Code that keeps tables
  keyed like :data:`DYNAMIC_OPS` (the tracer's layer rules) follows with :func:`on_layer_types_added`.
* **structural kinds** (:data:`STRUCTURAL_KINDS`): layer kinds found by what a module is rather than by its class
  (:class:`~pyprune.ops.channel_norm.DynamicChannelNorm`: HF's ``*RMSNorm``, T5's norm, timm's ``RmsNorm``, ...).
  A module with no listed base that the kind's ``matches`` accepts and whose own forward the serving probe accepts
  is of that kind; the kind itself is its key in :data:`DYNAMIC_OPS` (what :func:`registered_base` returns).
"""
import importlib
import sys
from typing import Callable, Dict, List, Optional, Type

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .attention import WINDOW_ATTENTION_OPS, DynamicMultiheadAttention
from .base import DynamicChannelMixin
from .batchnorm import DynamicBatchNorm1d, DynamicBatchNorm2d, DynamicBatchNorm3d
from .channel_norm import DynamicChannelNorm
from .conv import DynamicConv1d, DynamicConv2d, DynamicConv3d
from .embedding import DynamicEmbedding
from .groupnorm import DynamicGroupNorm
from .kind_table import LayerKindTable
from .layer_kind import check_layer_kind
from .layernorm import DynamicLayerNorm, is_channels_first_layer_norm
from .linear import DynamicLinear
from .parameter import ChannelCount, ChannelParameter
from .served import has_own_forward, served_class, serving_probe

__all__ = ["DYNAMIC_OPS", "register_layer_kind", "STRUCTURAL_KINDS", "OPTIONAL_OPS", "to_dynamic", "layer_kind",
           "registered_base", "structural_kind", "is_prunable_layer", "unservable_reason", "on_layer_types_added"]

class _LayerTable(LayerKindTable):
    """A dict that first merges the DynamicOps of optional libraries imported since (see the module docstring),
    so every reader sees them: lookups, ``in``, iteration, ``len``, ``keys`` / ``values`` / ``items``; every entry is
    checked as it is added (:class:`~pyprune.ops.kind_table.LayerKindTable`)."""

    def __getitem__(self, key):
        _list_optional_ops()
        return super().__getitem__(key)

    def __contains__(self, key):
        _list_optional_ops()
        return super().__contains__(key)

    def __iter__(self):
        _list_optional_ops()
        return super().__iter__()

    def __len__(self):
        _list_optional_ops()
        return super().__len__()

    def get(self, key, default=None):
        _list_optional_ops()
        return super().get(key, default)

    def keys(self):
        _list_optional_ops()
        return super().keys()

    def values(self):
        _list_optional_ops()
        return super().values()

    def items(self):
        _list_optional_ops()
        return super().items()


# torch layer type -> DynamicOp type. Subclasses of these map through their nearest listed base (MRO order).
DYNAMIC_OPS: Dict[Type[nn.Module], Type[DynamicChannelMixin]] = _LayerTable({
    nn.Conv1d: DynamicConv1d,
    nn.Conv2d: DynamicConv2d,
    nn.Conv3d: DynamicConv3d,
    nn.Linear: DynamicLinear,
    nn.BatchNorm1d: DynamicBatchNorm1d,
    nn.BatchNorm2d: DynamicBatchNorm2d,
    nn.BatchNorm3d: DynamicBatchNorm3d,
    nn.LayerNorm: DynamicLayerNorm,
    nn.GroupNorm: DynamicGroupNorm,
    nn.MultiheadAttention: DynamicMultiheadAttention,
    nn.Embedding: DynamicEmbedding,
    **WINDOW_ATTENTION_OPS,  # torchvision's Swin attention (v1, v2), when torchvision is installed
    DynamicChannelNorm: DynamicChannelNorm,  # a structural kind: keyed by itself
})
for _slot_kind in (ChannelParameter, ChannelCount):  # the kinds of channel slots (found by isinstance, not listed)
    check_layer_kind(_slot_kind)

# Layer kinds found by a structural test (``kind.matches(module)``) and the serving probe, not by class.
STRUCTURAL_KINDS = (DynamicChannelNorm,)

# module of an optional library -> the pyprune module whose LAYER_OPS ({layer type: DynamicOp}) join DYNAMIC_OPS
OPTIONAL_OPS: Dict[str, str] = {"transformers.pytorch_utils": "pyprune.ops.hf_conv1d"}  # GPT-2's Conv1D
_PENDING: Dict[str, str] = dict(OPTIONAL_OPS)
_LISTENERS: List[Callable[[Dict[type, type]], None]] = []
_ADDED: Dict[type, type] = {}


def on_layer_types_added(listener: Callable[[Dict[type, type]], None]) -> None:
    """Call ``listener({layer type: DynamicOp})`` with the optional types listed so far and each time more join."""
    _LISTENERS.append(listener)
    if _ADDED:
        listener(dict(_ADDED))


def _list_optional_ops() -> None:
    """Merge the DynamicOps of optional libraries imported since the last lookup (a dict lookup when none is)."""
    if not _PENDING:
        return
    for library in [name for name in _PENDING if name in sys.modules]:
        added = importlib.import_module(_PENDING.pop(library)).LAYER_OPS
        DYNAMIC_OPS.update(added)  # checked like every entry
        _ADDED.update(added)
        for listener in _LISTENERS:
            listener(dict(added))


def register_layer_kind(layer_type: Type[nn.Module], op: Type[DynamicChannelMixin]) -> None:
    """Make ``op`` (a DynamicOp class) the layer kind of ``layer_type`` and its subclasses: ``DYNAMIC_OPS[layer_type]
    = op``, checked first (TypeError naming ``op`` and each missing method; nothing is registered then). The tracer
    needs a rule for the type too (``@pyprune.tracing.rules_layers.layer_rule(layer_type)``); without one it fixes
    the layer's channel groups, saying so."""
    DYNAMIC_OPS[layer_type] = op


def registered_base(module: nn.Module) -> Optional[type]:
    """The nearest base class of ``module`` (itself included) that :data:`DYNAMIC_OPS` lists; for a module
    without one, the structural kind it is of (see the module docstring); else None."""
    for base in type(module).__mro__:
        if base in DYNAMIC_OPS:
            return base
    return structural_kind(module)


def structural_kind(module: nn.Module) -> Optional[type]:
    """The structural kind whose test ``module`` passes and whose serving probe accepts it, or None."""
    if isinstance(module, (DynamicChannelMixin, ChannelParameter)):
        return None
    for kind in STRUCTURAL_KINDS:
        if kind.matches(module) and serving_probe(module, kind).ok:
            return kind
    return None


def layer_kind(layer) -> Optional[type]:
    """The class that answers the layer-kind questions for ``layer`` (a plain torch layer, a DynamicOp or a
    :class:`ChannelParameter`), or None for layers pyprune cannot prune."""
    if isinstance(layer, (DynamicChannelMixin, ChannelParameter)):
        return type(layer)
    base = registered_base(layer)
    return None if base is None else DYNAMIC_OPS[base]


def is_prunable_layer(module: nn.Module) -> bool:
    """A layer the tracer keeps opaque and the units can convert: a listed type (or subclass) that keeps its base's
    ``forward``, a channels-first LayerNorm subclass (torchvision's ``LayerNorm2d``), or a subclass whose own
    ``forward`` can be served at the active width (``pyprune.ops.served``: timm's ``BatchNormAct2d``, ...)."""
    base = registered_base(module)
    if base is None:
        return False
    if base in STRUCTURAL_KINDS:  # found by its probe already
        return True
    if not has_own_forward(module, base) or is_channels_first_layer_norm(module):
        return True
    return serving_probe(module).ok


def unservable_reason(module: nn.Module) -> str:
    """Why a subclass of a listed layer type cannot be pruned ('' when it can, or is no such subclass)."""
    base = registered_base(module)
    if base is None or is_prunable_layer(module):
        return ""
    return f"{type(module).__name__} overrides forward and {serving_probe(module).reason}"


def to_dynamic(module: nn.Module) -> Optional[DynamicChannelMixin]:
    """The DynamicOp for ``module`` (sharing its parameters), ``module`` itself if it already is one, or ``None``
    when there is none: an unknown type, an uninitialised lazy layer, or a configuration the op cannot run
    (e.g. a LayerNorm over several dims)."""
    if isinstance(module, DynamicChannelMixin):
        return module
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return None
    kind = layer_kind(module)
    if kind is None or not kind.can_convert(module):
        return None
    if kind in STRUCTURAL_KINDS:
        return kind.convert_from(module)  # served through its own forward (probed by registered_base)
    if has_own_forward(module, registered_base(module)) and not is_channels_first_layer_norm(module):
        if not serving_probe(module).ok:
            return None
        return served_class(type(module), kind).convert_from(module)
    return kind.convert_from(module)
