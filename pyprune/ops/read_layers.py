"""Layers whose tensors the code of an enclosing module reads directly, instead of calling the layer.

timm's BEiT / EVA attention computes ``F.linear(x, weight=self.qkv.weight, bias=qkv_bias)`` in its own forward:
the fused ``qkv`` Linear is never called, so its DynamicOp's forward cannot hand out the kept weight. Instead the
enclosing module (the *reader*, named by the tracer in the layer's refs: ``ChannelRef.read_by``) serves it: while
the reader's forward runs, the layer's channel tensors (``weight`` ``[K_out, K_in]``, ``bias`` ``[K_out]``) and
width attributes (``in_features`` / ``out_features``) are instance attributes at the active width, found before
``nn.Module.__getattr__`` looks in ``_parameters``. They come from the op's tensor provider (gather, eval cache,
compact training mode's held tensors, a batched hand-off), as for a forward of the op itself, so gradients reach
the kept channels of the full tensors. Outside the reader's forward nothing changes: ``_parameters``,
``state_dict``, and everything pyprune reads (importance, export, compact mode) see the full tensors.

:class:`ReadCalls` reports the calls that use a served weight (``F.linear(x, self.qkv.weight, ...)``) as calls of
its layer, so the budget's cost model records their shapes as it records a called layer's.

The reader carries a forward pre-hook and an always-called forward hook (module-level functions that find the
layers by their paths under the reader, so deep copies and pickles of the model serve their own layers);
:func:`release_read_layers` takes them off when the model is exported to plain layers.
"""
from typing import Callable, Iterable, List, Tuple

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError
from .base import DynamicChannelMixin

__all__ = ["serve_read_layers", "read_layers", "release_read_layers", "ReadCalls"]

_READS = "_pyprune_read_layers"  # reader.__dict__: paths (under the reader) of the layers it serves
_SAVED = "_pyprune_read_saved"   # reader.__dict__: per running forward, what the served attributes replaced


def serve_read_layers(model: nn.Module, refs: Iterable) -> None:
    """For every ref with ``read_by`` set, make that module serve the ref's layer to its own forward (idempotent).
    Every ref is checked first: ConfigError (nothing changed) when a reader is no module of ``model``, does not
    contain the ref's layer, or the layer is no module of it."""
    for reader, path in [_reader_of(model, ref) for ref in refs if getattr(ref, "read_by", None) is not None]:
        _serve(reader, path)


def _reader_of(model: nn.Module, ref) -> Tuple[nn.Module, str]:
    """(reader module, path of the ref's layer under it)."""
    reader_path = ref.read_by
    if reader_path and not ref.name.startswith(reader_path + "."):
        raise ConfigError(f"{ref.name}: read_by {reader_path!r} names a module that does not contain it")
    try:
        reader = model.get_submodule(reader_path) if reader_path else model
        path = ref.name[len(reader_path) + 1:] if reader_path else ref.name
        reader.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"{ref.name}: read_by {reader_path!r}: the model has no such module holding it") from None
    return reader, path


def read_layers(reader: nn.Module) -> Tuple[str, ...]:
    """Paths (under ``reader``) of the layers ``reader`` serves to its forward."""
    return reader.__dict__.get(_READS, ())


def _serve(reader: nn.Module, path: str) -> None:
    served = read_layers(reader)
    if path in served:
        return
    if not served:
        reader.register_forward_pre_hook(_hand_out, with_kwargs=True)
        reader.register_forward_hook(_take_back, always_call=True)
    reader.__dict__[_READS] = served + (path,)


def _hand_out(reader: nn.Module, args: tuple, kwargs: dict) -> None:
    """Pre-hook: each served DynamicOp's active tensors and width attributes become its instance attributes."""
    x = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)), None)
    lent: List[Tuple[DynamicChannelMixin, dict]] = []
    reader.__dict__.setdefault(_SAVED, []).append(lent)  # first: a gather that raises is taken back too
    for path in read_layers(reader):
        layer = reader.get_submodule(path)
        if not isinstance(layer, DynamicChannelMixin):
            continue  # a plain layer (exported, or not converted): its own tensors are the right ones
        lent.append((layer, layer.lend_active_state(layer.active_tensors(x))))


def _take_back(reader: nn.Module, args: tuple, output) -> None:
    """Forward hook (also after an exception): the served layers' attributes are what they were before."""
    stack = reader.__dict__.get(_SAVED)
    if not stack:
        return
    for layer, replaced in stack.pop():
        layer.restore_lent_state(replaced)


def release_read_layers(model: nn.Module) -> None:
    """Every reader in ``model`` stops serving: its hooks and bookkeeping removed (an exported model is plain)."""
    for module in model.modules():
        if _READS not in module.__dict__:
            continue
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if hook in (_hand_out, _take_back)]:
                hooks.pop(key)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        module.__dict__.pop(_READS, None)
        module.__dict__.pop(_SAVED, None)


class ReadCalls(TorchFunctionMode):
    """While on, each ``linear`` call whose weight is the one a reader hands out of a served layer of ``model``
    is reported as ``on_call(layer, args, kwargs, output)``: what a forward hook of the layer would see, had the
    code called it."""

    def __init__(self, model: nn.Module, on_call: Callable):
        super().__init__()
        self.layers = [reader.get_submodule(path) for reader in model.modules() for path in read_layers(reader)]
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if self.layers and getattr(func, "__name__", "") == "linear":
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            for layer in self.layers:
                if weight is not None and layer.__dict__.get("weight") is weight:
                    self.on_call(layer, args, kwargs, output)
        return output
