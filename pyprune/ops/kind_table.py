"""The layer-kind table's entry check: a DynamicOp class is registered for a torch layer type only when complete.

``pyprune.ops.DYNAMIC_OPS`` is a :class:`LayerKindTable`: every entry, whether listed at import, merged in for an
optional library or added by a user (``DYNAMIC_OPS[MyLayer] = DynamicMyLayer`` or
``pyprune.ops.register_layer_kind``), passes :func:`check_dynamic_op` as it is added, so a missing step of "How to
add a layer type" (docs/ARCHITECTURE.md) fails there, with a TypeError naming the class and every missing method,
rather than deep inside a unit, the tracer or the budget at run time.
"""
from typing import List

from torch import nn

from .base import DynamicChannelMixin
from .layer_kind import missing_facts

__all__ = ["LayerKindTable", "check_dynamic_op", "dynamic_op_problems"]

# What a DynamicOp class must define itself (each group: at least one name), beyond the layer-kind facts.
_OP_METHODS = (("forward",), ("_static_module", "export"), ("_channel_dims", "_check_input"))


def _defined_by_op(op: type, name: str) -> bool:
    """Whether ``name`` resolves on ``op`` to a definition of a DynamicOp class below :class:`DynamicChannelMixin`
    (not the mixin's placeholder, not the torch layer's own method)."""
    owner = next((cls for cls in op.__mro__ if name in cls.__dict__), None)
    return owner is not None and owner is not DynamicChannelMixin and issubclass(owner, DynamicChannelMixin)


def dynamic_op_problems(layer_type: type, op: type) -> List[str]:
    """Everything that keeps ``op`` from serving ``layer_type`` (empty when it can): the missing layer-kind facts,
    and for an op replacing a torch layer (not a structural kind, keyed by itself) that it subclasses the layer,
    names it as ``_torch_type`` and defines ``forward``, ``_static_module`` (or ``export``) and ``_channel_dims``
    (or ``_check_input``)."""
    problems = missing_facts(op)
    if op is layer_type:  # a structural kind: served through each layer's own forward (pyprune.ops.served)
        return problems
    if not issubclass(op, layer_type):
        problems.append(f"it must subclass the layer it replaces, {layer_type.__qualname__}")
    if not _defined_by_op(op, "_torch_type") or not issubclass(layer_type, op._torch_type):
        problems.append(f"_torch_type (the plain layer export builds, a base of {layer_type.__qualname__}) is not set")
    for names in _OP_METHODS:
        if not any(_defined_by_op(op, name) for name in names):
            problems.append(f"{' or '.join(names)} (not implemented)")
    return problems


def check_dynamic_op(layer_type, op) -> None:
    """TypeError naming ``op`` and every missing method when it cannot be ``layer_type``'s DynamicOp."""
    if not isinstance(layer_type, type) or not (issubclass(layer_type, nn.Module) or layer_type is op):
        raise TypeError(f"a layer-kind table key must be an nn.Module class (or a structural kind keyed by itself), "
                        f"got {layer_type!r}")
    if not isinstance(op, type) or not issubclass(op, DynamicChannelMixin):
        raise TypeError(f"the layer kind of {layer_type.__qualname__} must be a DynamicOp class (a subclass of "
                        f"pyprune.ops.DynamicChannelMixin), got {op!r}")
    problems = dynamic_op_problems(layer_type, op)
    if problems:
        raise TypeError(f"{op.__module__}.{op.__qualname__} cannot be registered as the DynamicOp of "
                        f"{layer_type.__module__}.{layer_type.__qualname__}: {'; '.join(problems)} (see "
                        f"docs/ARCHITECTURE.md, 'How to add a layer type')")


class LayerKindTable(dict):
    """``{torch layer type: DynamicOp class}`` whose every write (item, ``update``, ``setdefault``, ``|=``, the
    constructor) checks the entry with :func:`check_dynamic_op` first; a refused entry leaves the table unchanged
    (``update`` checks every entry before adding any)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.update(*args, **kwargs)

    def __setitem__(self, layer_type, op) -> None:
        check_dynamic_op(layer_type, op)
        super().__setitem__(layer_type, op)

    def update(self, *args, **kwargs) -> None:
        entries = dict(*args, **kwargs)
        for layer_type, op in entries.items():
            check_dynamic_op(layer_type, op)
        super().update(entries)

    def setdefault(self, layer_type, op=None):
        if layer_type not in self:
            self[layer_type] = op
        return self[layer_type]

    def __ior__(self, other):
        self.update(other)
        return self
