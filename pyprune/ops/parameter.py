"""ChannelParameter: a channel-sized parameter or buffer that a module's own code uses, served at the active channels.

Some models multiply or add a bare tensor of the channel width into a stream: ConvNeXt's ``layer_scale``
``[C, 1, 1]``, ViT-style ``class_token`` ``[1, 1, D]`` / ``pos_embedding`` ``[1, S, D]``, CaiT's ``gamma``. No layer
owns those channels, so no DynamicOp can serve them. Instead the owning module's class is swapped for a subclass
(as ``torch.nn.utils.parametrize`` does) whose attribute lookup returns ``tensor.index_select(dim, index)`` for the
attached names, so ``self.layer_scale * x`` in the model's unchanged code sees ``[K, 1, 1]``. The full tensor stays
registered under its name (``parameters()``, optimizers and ``state_dict`` keys are unchanged; gradients flow back
into the kept channels). The slot's index is derived: the unit that covers the tensor owns the selection, pushes it
through ``set_out_index`` and saves it (per unit) in the prepared model's state_dict; the owner's state_dict keys
and extra state are its own.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import ChannelSelectionError, ConfigError
from .config_view import own_config
from .cost_terms import NO_COST, Bilinear, CostTerms, ParameterCount
from .layer_kind import OneSelectionKind

__all__ = ["ChannelParameter", "ChannelCount", "channel_parameter", "channel_parameters", "export_channel_parameters",
           "resolve_tensor"]

_SLOTS = "_pyprune_channel_parameters"  # owner.__dict__ key: {attribute: ChannelParameter}


def _owner_of(model: nn.Module, path: str) -> Tuple[Optional[nn.Module], str]:
    """(module holding the attribute at ``path`` or None, attribute name)."""
    owner_path, _, attribute = path.rpartition(".")
    try:
        return (model.get_submodule(owner_path) if owner_path else model), attribute
    except AttributeError:
        return None, attribute


def resolve_tensor(model: nn.Module, path: str) -> Tuple[nn.Module, str, Tensor]:
    """(owner module, attribute, tensor) of the parameter or buffer at ``path`` (e.g. ``features.1.0.layer_scale``);
    ConfigError when there is none."""
    owner, attribute = _owner_of(model, path)
    tensor = None if owner is None else owner._parameters.get(attribute, owner._buffers.get(attribute))
    if tensor is None:
        raise ConfigError(f"the model has no parameter or buffer named {path!r}")
    return owner, attribute, tensor


class ChannelParameter(OneSelectionKind):
    """The channels ``index`` of dim ``dim`` of the tensor ``path``; behaves like a single-selection DynamicOp for
    the units (``set_out_index`` / ``set_in_index``, ``out_index``, ``active_out_channels``) and is its own layer
    kind (one channel dim: in and out are one selection).

    Built detached (nothing in the model changes); :meth:`attach` makes the owner serve the compact tensor and
    :meth:`export` writes the compact tensor into the owner for good.
    """

    def __init__(self, model: nn.Module, path: str, dim: int):
        owner, attribute, tensor = resolve_tensor(model, path)
        if not -tensor.dim() <= dim < tensor.dim():
            raise ConfigError(f"{path}: dim {dim} is out of range for a tensor of shape {tuple(tensor.shape)}")
        self._bind(owner, attribute, path, dim % tensor.dim(), tensor.shape[dim])

    def _bind(self, owner: nn.Module, attribute: str, path: str, dim: Optional[int], num_channels: int) -> None:
        """The state every channel slot has: where it lives, its channel dim and width, all channels kept."""
        self.owner, self.attribute, self.pyprune_name, self.dim = owner, attribute, path, dim
        self.num_channels = int(num_channels)
        self._index: Optional[Tensor] = None

    # ------------------------------------------------------------- layer kind (the rest: LayerKind's common answers)
    @classmethod
    def channel_counts(cls, layer: "ChannelParameter") -> Tuple[int, int]:
        return layer.num_channels, layer.num_channels

    @classmethod
    def cost_terms(cls, layer: "ChannelParameter", calls) -> CostTerms:
        """No FLOPs; a Parameter ``numel / C`` elements per kept channel (a buffer or an int width: nothing)."""
        tensor = layer.tensor
        if not isinstance(tensor, nn.Parameter):
            return NO_COST
        per_channel = Bilinear(c=float(tensor.numel() // layer.num_channels))
        return CostTerms(Bilinear(), (ParameterCount(tensor, per_channel),))

    @classmethod
    def probe_inputs(cls, layer: "ChannelParameter"):
        return []  # not a layer with a forward

    @property
    def tensor(self) -> Tensor:
        """The full tensor, as registered in the owner."""
        owner = self.owner
        return owner._parameters.get(self.attribute, owner._buffers.get(self.attribute))

    @property
    def device(self) -> torch.device:
        """Where the kept-channel index lives."""
        return self.tensor.device

    # ---------------------------------------------------------------------------------------- selection (trusted)
    def set_out_index(self, index: Optional[Tensor]) -> None:
        """Trusted: sorted unique int64 channel index on the tensor's device, or None for every channel."""
        self._index = None if index is None or index.shape[0] == self.num_channels else index
        reset_derived_state(self.owner)

    set_in_index = set_out_index  # one channel dim: both sides are the same selection

    @property
    def out_index(self) -> Optional[Tensor]:
        return self._index

    in_index = out_index

    @property
    def active_out_channels(self) -> int:
        return self.num_channels if self._index is None else self._index.shape[0]

    active_in_channels = active_out_channels

    def compact(self, tensor: Tensor) -> Tensor:
        """``tensor`` at the kept channels of dim ``dim`` (differentiable); ``tensor`` itself when all are kept."""
        return tensor if self._index is None else tensor.index_select(self.dim, self._index)

    # ------------------------------------------------------------------------------------------------ attaching
    @property
    def attached(self) -> bool:
        return self.owner.__dict__.get(_SLOTS, {}).get(self.attribute) is self

    def attach(self) -> "ChannelParameter":
        """Make the owner serve the compact tensor under its attribute name (idempotent)."""
        slots = self.owner.__dict__.setdefault(_SLOTS, {})
        slots[self.attribute] = self
        self.owner.__class__ = _serving_class(type(self.owner))
        return self

    def export(self) -> None:
        """Replace the owner's full tensor by a compact copy and detach (the owner's class is restored when it
        serves nothing else)."""
        tensor = self.tensor
        with torch.no_grad():
            compact = self.compact(tensor).detach().clone()
        if isinstance(tensor, nn.Parameter):
            self.owner._parameters[self.attribute] = nn.Parameter(compact, requires_grad=tensor.requires_grad)
        else:
            self.owner._buffers[self.attribute] = compact
        self._detach()
        reset_derived_state(self.owner)

    def _detach(self) -> None:
        slots = self.owner.__dict__.get(_SLOTS, {})
        slots.pop(self.attribute, None)
        if not slots:
            self.owner.__dict__.pop(_SLOTS, None)
            self.owner.__class__ = type(self.owner).__bases__[1]

    def __repr__(self) -> str:
        return f"ChannelParameter({self.pyprune_name}, dim={self.dim}, {self.active_out_channels}/{self.num_channels})"


class ChannelCount(ChannelParameter):
    """A module's int attribute that its code uses as the channel width of a shape, e.g. ViT's ``hidden_dim`` in
    ``x.reshape(n, self.hidden_dim, -1)``, or that holds a head count / width (timm's ``num_heads``, BERT's
    ``all_head_size``): kept equal to the active channel count (and so exported at it).

    ``span`` is how many channels the units' ranges give it (the end of its widest range). Wider than the value by
    a whole factor ``k``, the attribute counts one of ``k`` equal blocks: it holds the active count divided by
    ``k`` (HF's ``num_key_value_groups``: query heads per key / value head, with the query heads' unit balanced over
    the ``k`` key / value heads).

    ``path`` may name an int of the plain config object a module holds
    (``layers.0.self_attn.config.num_attention_heads``: Phi-3 computes its q | k | v slice bounds from it). That
    config is shared by every layer, so the first write gives the module a
    :class:`~pyprune.ops.config_view.ConfigView` of its own holding the count; the shared config is never written.
    """

    def __init__(self, model: nn.Module, path: str, span: Optional[int] = None):
        owner, attribute = _owner_of(model, path)
        holder = None
        if owner is None:  # an attribute of a module's config object (``self_attn.config.num_attention_heads``)
            owner, holder = _owner_of(model, path.rpartition(".")[0])
            attribute = f"{holder}.{attribute}"
        value = _count_value(owner, attribute)
        if value is None:
            raise ConfigError(f"the model has no module, parameter, buffer or int attribute named {path!r}")
        self.per = span // value if span is not None and value > 0 and span > value and span % value == 0 else 1
        self._bind(owner, attribute, path, None, value * self.per)

    @property
    def device(self) -> torch.device:
        return next((t.device for t in self.owner.parameters()), torch.device("cpu"))

    def set_out_index(self, index: Optional[Tensor]) -> None:
        """Trusted, as for any channel slot; the attribute becomes the active count (divided by ``per``)."""
        count = self.num_channels if index is None else index.shape[0]
        if count % self.per:  # a Python int: the units keep their selections balanced, so this is a bug upstream
            raise ChannelSelectionError(f"{self.pyprune_name}: {count} channels do not split into {self.per} "
                                        f"equal blocks")
        super().set_out_index(index)
        count = self.active_out_channels // self.per
        holder, _, attribute = self.attribute.rpartition(".")
        if holder:  # the config is shared with other modules: this module gets a view of its own to hold it
            setattr(own_config(self.owner, holder), attribute, count)
        else:
            self.owner.__dict__[attribute] = count

    set_in_index = set_out_index

    def compact(self, value):
        return value

    def export(self) -> None:
        """The attribute already holds the active count, which the exported module needs: just detach."""
        self._detach()

    def __repr__(self) -> str:
        per = f", per {self.per}" if self.per != 1 else ""
        return f"ChannelCount({self.pyprune_name}, {self.active_out_channels}/{self.num_channels}{per})"


def _count_value(owner: Optional[nn.Module], attribute: str) -> Optional[int]:
    """The int ``owner.<attribute>`` (``attribute`` a name in the module's ``__dict__``, or ``config.<name>``: an
    int of a plain object the module holds), or None."""
    if owner is None:
        return None
    holder, _, name = attribute.rpartition(".")
    if not holder:
        value = owner.__dict__.get(name)
    else:
        config = owner.__dict__.get(holder)
        if config is None or isinstance(config, (nn.Module, Tensor)) or "." in holder:
            return None
        value = getattr(config, name, None)
    return value if type(value) is int else None


def reset_derived_state(owner: nn.Module) -> None:
    """Make ``owner`` drop what it derived from its tensors at another selection.

    Modules that cache a tensor computed from their parameters (timm's LeViT / TinyViT / EfficientFormer attention
    keep ``attention_biases[:, idxs]`` per device in eval mode) drop the cache in an overridden ``train()``, the
    call that marks their parameters as about to change. It is called with the owner's own mode, and every
    submodule's mode is put back after (``train`` recurses), so only the derived state changes."""
    if type(owner).train is nn.Module.train:
        return
    modes = [(module, module.training) for module in owner.modules()]
    owner.train(owner.training)
    for module, mode in modes:
        module.training = mode


class _ServesChannelParameters:
    """Mixed in front of an owner's class: attached tensors are read at their kept channels."""

    def __getattr__(self, name: str):
        value = super().__getattr__(name)
        slot = self.__dict__.get(_SLOTS, {}).get(name)
        return value if slot is None else slot.compact(value)

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.cuda()``: the kept-channel indices follow their tensors."""
        result = super()._apply(fn, *args, **kwargs)
        for slot in self.__dict__.get(_SLOTS, {}).values():
            if slot.out_index is not None:
                slot.set_out_index(slot.out_index.to(slot.device))
        return result


_SERVING_CLASSES: Dict[type, type] = {}


def _serving_class(cls: type) -> type:
    """``cls`` with :class:`_ServesChannelParameters` in front (one class per owner type, made once)."""
    if issubclass(cls, _ServesChannelParameters):
        return cls
    if cls not in _SERVING_CLASSES:
        _SERVING_CLASSES[cls] = type(cls.__name__, (_ServesChannelParameters, cls),
                                     {"__module__": __name__, "__qualname__": f"ChannelParameters[{cls.__qualname__}]"})
    return _SERVING_CLASSES[cls]


def channel_parameter(model: nn.Module, path: str, dim: Optional[int], span: Optional[int] = None) -> ChannelParameter:
    """The attached ChannelParameter (``dim`` given) or ChannelCount (``dim`` None; ``span``: see ChannelCount) of
    ``path`` if there is one, else a new detached one (nothing changes)."""
    fresh = ChannelParameter(model, path, dim) if dim is not None else ChannelCount(model, path, span)
    attached = fresh.owner.__dict__.get(_SLOTS, {}).get(fresh.attribute)
    return attached if attached is not None else fresh


def channel_parameters(model: nn.Module):
    """Every attached :class:`ChannelParameter` in ``model``."""
    for module in model.modules():
        yield from list(module.__dict__.get(_SLOTS, {}).values())


def export_channel_parameters(model: nn.Module) -> None:
    """Write every attached channel parameter of ``model`` compact, in place (see :meth:`ChannelParameter.export`)."""
    for slot in list(channel_parameters(model)):
        slot.export()
