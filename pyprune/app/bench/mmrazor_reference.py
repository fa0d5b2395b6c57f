"""An mmrazor-style dynamic-layer baseline, written from mmrazor's documented behaviour (see benchmarks/RESULTS.md).

What it reproduces, per forward call, because that is where mmrazor spends its time:

* every layer asks a *channel container* for its in / out mask; the container ``torch.cat``s the masks of the
  mutable channels registered on ``[start, end)`` ranges (ranges without a mutable get a ``torch.ones(n).bool()``
  piece, filled once as mmrazor's ``_fill_unregistered_range`` does) and calls ``.bool()``. The pieces live on the
  host (mmrazor's ``SimpleMutableChannel.mask`` is a plain tensor attribute), so each call moves the mask to the
  weight's device with ``.to(device)``;
* conv / linear weights are sliced by boolean indexing ``weight[out_mask][:, in_mask]`` (bias ``bias[out_mask]``),
  which costs a ``nonzero`` and a device->host sync per mask on CUDA; depthwise convs slice ``weight[out_mask]``
  and run with ``groups = x.size(1)``; grouped convs reshape the masks to ``[G, -1]``, check equal counts per group
  with ``.item()`` and index ``weight.flatten(0, 1)`` with the outer-product mask;
* batch norm slices weight, bias and *copies* of the running stats with the mask, lets ``F.batch_norm`` update the
  copies, then writes them back with ``running_*.masked_scatter_(mask, copy)``; ``num_batches_tracked`` is replaced
  by ``num_batches_tracked + 1`` (a new tensor), as mmrazor does;
* layer norm slices weight / bias and normalises over the active count.

The slicing itself is a set of functions on a plain layer and its boolean masks (:func:`masked_forward`,
:func:`masked_weight`, :func:`masked_batch_norm`, ...): the reference layers below call them with their
containers' masks, and pyprune's tests check every DynamicOp against them.

``build_reference_model`` swaps every pyprune DynamicOp of a prepared model for the matching layer here, with the
same selection, so the same subnet runs on both and their outputs can be compared.
"""
import copy
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ...ops.attention import attention_forward


class MaskChannel:
    """One mutable channel group's mask, ``bool [num_channels]`` kept on the host (mmrazor SimpleMutableChannel)."""

    def __init__(self, num_channels: int, groups: int = 1):
        self.num_channels, self.groups = num_channels, groups
        self.mask = torch.ones(num_channels).bool()

    @property
    def current_mask(self) -> Tensor:
        return self.mask

    def set_prefix(self, count: int) -> None:
        """Keep the first ``count`` channels (mmrazor's sequential unit: a fresh zero mask, prefix set True); with
        ``groups`` blocks (grouped conv, attention heads) the first ``count / groups`` of each block."""
        mask = torch.zeros(self.num_channels).bool()
        mask.view(self.groups, -1)[:, :count // self.groups] = True
        self.mask = mask

    def set_mask(self, mask: Tensor) -> None:
        self.mask = mask.detach().to("cpu", torch.bool).clone()


class ExpandedMaskChannel:
    """A channel group seen through ``flatten`` (mmrazor's derived ``expand_mask``): each channel -> ``expand``."""

    def __init__(self, source: MaskChannel, expand: int):
        self.source, self.expand = source, expand
        self.num_channels = source.num_channels * expand

    @property
    def current_mask(self) -> Tensor:
        return self.source.current_mask.unsqueeze(-1).expand(-1, self.expand).flatten()


class MaskContainer:
    """mmrazor's MutableChannelContainer: masks registered on ``[start, end)`` ranges, concatenated every call."""

    def __init__(self, num_channels: int):
        self.num_channels = num_channels
        self.pieces: Dict[Tuple[int, int], object] = {}

    def register(self, channel, start: int, end: int) -> None:
        if end - start != channel.num_channels:
            raise ConfigError(f"mask range [{start}, {end}) does not match a group of {channel.num_channels} channels")
        self.pieces[(start, end)] = channel

    def _fill_unregistered(self) -> None:
        last_end = 0
        for start, end in sorted(self.pieces):
            if last_end < start:
                self.pieces[(last_end, start)] = MaskChannel(start - last_end)
            last_end = end
        if last_end < self.num_channels:
            self.pieces[(last_end, self.num_channels)] = MaskChannel(self.num_channels - last_end)

    @property
    def current_mask(self) -> Tensor:
        if not self.pieces:
            return torch.ones([self.num_channels]).bool()
        self._fill_unregistered()
        ordered = [self.pieces[key] for key in sorted(self.pieces)]
        return torch.cat([piece.current_mask for piece in ordered]).bool()


def _adopt(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s parameters, buffers and settings (its own registries, though)."""
    layer = cls.__new__(cls)
    for key, value in module.__dict__.items():
        object.__setattr__(layer, key, copy.copy(value) if isinstance(value, dict) else value)
    return layer


class _ReferenceChannelLayer:
    """Holds the in / out containers; ``pyprune_name`` names the layer in errors."""
    in_container: MaskContainer
    out_container: MaskContainer
    pyprune_name: str = ""

    def _init_containers(self, in_channels: int, out_channels: int) -> None:
        self.in_container = MaskContainer(in_channels)
        self.out_container = MaskContainer(out_channels)

    def _masks(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        """(in mask, out mask), assembled on the host and moved to ``device`` (every call, as mmrazor's)."""
        return self.in_container.current_mask.to(device), self.out_container.current_mask.to(device)


# ------------------------------------------------------------------------------- boolean slicing, one layer at a time
def _layer_name(layer: nn.Module) -> str:
    return getattr(layer, "pyprune_name", "") or type(layer).__name__


def masked_bias(layer: nn.Module, out_mask: Tensor) -> Optional[Tensor]:
    """``bias[out_mask]`` (``[K_out]``), or None for a layer without bias."""
    return layer.bias[out_mask].contiguous() if layer.bias is not None else None


def masked_weight(layer: nn.Module, out_mask: Tensor, in_mask: Tensor) -> Tensor:
    """The compact weight of a conv / linear by boolean indexing, as mmrazor slices it.

    ``out_mask`` / ``in_mask``: bool ``[C_out]`` / ``[C_in]`` (global channels). Dense: ``weight[out_mask][:,
    in_mask]`` -> ``[K_out, K_in, *kernel]``; depthwise (groups = in = out channels): ``weight[out_mask]``;
    grouped: the outer product of the per-group masks over ``weight.flatten(0, 1)`` -> ``[K_out, K_in / G,
    *kernel]``, after checking with ``.item()`` (a host sync, as in mmrazor) that every group keeps as many
    channels (``ConfigError`` naming the layer otherwise).
    """
    groups = getattr(layer, "groups", 1)
    if groups == 1:
        weight = layer.weight[out_mask][:, in_mask]
    elif groups == layer.in_channels == layer.out_channels:
        weight = layer.weight[out_mask]
    else:
        out_per_group, in_per_group = out_mask.reshape(groups, -1), in_mask.reshape(groups, -1)
        kept_out, kept_in = out_per_group.sum(1), in_per_group.sum(1)
        if (kept_out != kept_out[0]).any().item() or (kept_in != kept_in[0]).any().item():
            raise ConfigError(f"{_layer_name(layer)}: grouped conv needs the same channel count in each of its "
                              f"{groups} groups")
        pair_mask = out_per_group.unsqueeze(-1) & in_per_group.unsqueeze(1)  # [G, O/G, I/G]
        rows = int(kept_out.sum().item())
        weight = layer.weight.flatten(0, 1)[pair_mask.flatten()].reshape(rows, -1, *layer.weight.shape[2:])
    return weight.contiguous()


def masked_conv2d(conv: nn.Conv2d, out_mask: Tensor, in_mask: Tensor, x: Tensor) -> Tensor:
    """``conv`` on the active channels: x ``[N, K_in, H, W]`` -> ``[N, K_out, H', W']`` (a depthwise conv runs with
    one group per input channel, ``groups = x.size(1)``; padding modes other than zeros pad first)."""
    groups = x.size(1) if conv.groups == conv.in_channels == conv.out_channels else conv.groups
    weight, bias = masked_weight(conv, out_mask, in_mask), masked_bias(conv, out_mask)
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, groups)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)


def masked_linear(linear: nn.Linear, out_mask: Tensor, in_mask: Tensor, x: Tensor) -> Tensor:
    """``weight[out_mask][:, in_mask]``, ``bias[out_mask]``: x ``[*, K_in]`` -> ``[*, K_out]``."""
    return F.linear(x, masked_weight(linear, out_mask, in_mask), masked_bias(linear, out_mask))


def masked_batch_norm(bn: nn.modules.batchnorm._BatchNorm, mask: Tensor, x: Tensor) -> Tensor:
    """mmrazor's DynamicBatchNorm on the channels in ``mask`` (bool ``[C]``): x ``[N, K, *]`` -> same shape.

    Weight, bias and *copies* of the running stats are sliced with the mask, ``F.batch_norm`` updates the copies,
    and ``running_*.masked_scatter_(mask, copy)`` writes them back; ``num_batches_tracked`` is replaced by
    ``num_batches_tracked + 1`` (a new tensor) on every training batch.
    """
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked = bn.num_batches_tracked + 1
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    weight = bn.weight[mask] if bn.affine else bn.weight
    bias = bn.bias[mask] if bn.affine else bn.bias
    if bn.track_running_stats:
        running_mean, running_var = bn.running_mean[mask], bn.running_var[mask]
    else:
        running_mean, running_var = bn.running_mean, bn.running_var
    out = F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, factor, bn.eps)
    if bn.training and bn.track_running_stats:
        bn.running_mean.masked_scatter_(mask, running_mean)
        bn.running_var.masked_scatter_(mask, running_var)
    return out


def masked_layer_norm(norm: nn.LayerNorm, mask: Tensor, x: Tensor) -> Tensor:
    """LayerNorm over the last dim with the active channels only (``normalized_shape = (K,)``); a channels-first
    norm (``channels_first``, pyprune's DynamicLayerNorm of a LayerNorm2d) over dim 1."""
    weight = norm.weight[mask] if norm.weight is not None else None
    bias = norm.bias[mask] if norm.bias is not None else None
    if getattr(norm, "channels_first", False):
        return F.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, norm.eps).movedim(-1, 1)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, norm.eps)


def masked_group_norm(norm: nn.GroupNorm, mask: Tensor, x: Tensor) -> Tensor:
    """GroupNorm with sliced affine parameters; the group count stays (channels are pruned evenly per group)."""
    weight = norm.weight[mask] if norm.weight is not None else None
    bias = norm.bias[mask] if norm.bias is not None else None
    return F.group_norm(x, norm.num_groups, weight, bias, norm.eps)


def masked_forward(layer: nn.Module, out_mask: Tensor, in_mask: Tensor, x: Tensor) -> Tensor:
    """What mmrazor computes for a plain ``layer`` (conv, linear, batch / layer / group norm) at the channels of
    the bool masks: every per-channel tensor of the full layer sliced by them. Norms read ``out_mask`` only."""
    if isinstance(layer, nn.Conv2d):
        return masked_conv2d(layer, out_mask, in_mask, x)
    if isinstance(layer, nn.Linear):
        return masked_linear(layer, out_mask, in_mask, x)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return masked_batch_norm(layer, out_mask, x)
    if isinstance(layer, nn.LayerNorm):
        return masked_layer_norm(layer, out_mask, x)
    if isinstance(layer, nn.GroupNorm):
        return masked_group_norm(layer, out_mask, x)
    raise ConfigError(f"{_layer_name(layer)}: no boolean-slicing reference for {type(layer).__name__}")


# ---------------------------------------------------------------------------------------------- reference layers
class ReferenceConv2d(nn.Conv2d, _ReferenceChannelLayer):
    """Conv2d that slices its weight by boolean masks on every call; shapes as ``nn.Conv2d`` with active channels."""

    @classmethod
    def convert_from(cls, conv: nn.Conv2d) -> "ReferenceConv2d":
        layer = _adopt(conv, cls)
        layer._init_containers(conv.in_channels, conv.out_channels)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        in_mask, out_mask = self._masks(self.weight.device)
        return masked_conv2d(self, out_mask, in_mask, x)


class ReferenceLinear(nn.Linear, _ReferenceChannelLayer):
    """Linear that slices ``weight[out_mask][:, in_mask]`` every call; x ``[*, K_in]`` -> ``[*, K_out]``."""

    @classmethod
    def convert_from(cls, linear: nn.Linear) -> "ReferenceLinear":
        layer = _adopt(linear, cls)
        layer._init_containers(linear.in_features, linear.out_features)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        in_mask, out_mask = self._masks(self.weight.device)
        return masked_linear(self, out_mask, in_mask, x)


class _ReferenceNorm(_ReferenceChannelLayer):
    """Norms have one channel dim: in and out share one container."""

    def _init_norm_container(self, num_features: int) -> None:
        self.out_container = MaskContainer(num_features)
        self.in_container = self.out_container

    def _feature_mask(self, device: torch.device) -> Tensor:
        return self.out_container.current_mask.to(device)


class _ReferenceBatchNorm(_ReferenceNorm):
    """Batch norm over the active channels with mmrazor's copy / ``masked_scatter_`` running-stat update."""

    @classmethod
    def convert_from(cls, bn: nn.modules.batchnorm._BatchNorm):
        layer = _adopt(bn, cls)
        layer._init_norm_container(bn.num_features)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        device = self.weight.device if self.weight is not None else self.running_mean.device
        return masked_batch_norm(self, self._feature_mask(device), x)


class ReferenceBatchNorm1d(_ReferenceBatchNorm, nn.BatchNorm1d):
    pass


class ReferenceBatchNorm2d(_ReferenceBatchNorm, nn.BatchNorm2d):
    pass


class ReferenceLayerNorm(nn.LayerNorm, _ReferenceNorm):
    """LayerNorm over the last dim with the active channels only (``normalized_shape = (K,)``)."""

    @classmethod
    def convert_from(cls, norm: nn.LayerNorm) -> "ReferenceLayerNorm":
        if len(norm.normalized_shape) != 1:
            raise ConfigError(f"reference LayerNorm supports one normalized dim, got {tuple(norm.normalized_shape)}")
        layer = _adopt(norm, cls)
        layer._init_norm_container(norm.normalized_shape[0])
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return masked_layer_norm(self, self._feature_mask(x.device), x)


class ReferenceMultiheadAttention(nn.MultiheadAttention, _ReferenceNorm):
    """Attention over the masked embedding channels: every call concatenates the q / k / v row masks and slices
    ``in_proj_weight[rows][:, mask]`` and ``out_proj.weight[mask][:, mask]`` (one mask, like a norm's)."""

    @classmethod
    def convert_from(cls, attention: nn.MultiheadAttention) -> "ReferenceMultiheadAttention":
        layer = _adopt(attention, cls)
        layer._init_norm_container(attention.embed_dim)
        return layer

    def forward(self, query: Tensor, key: Tensor, value: Tensor, **options):
        mask = self._feature_mask(query.device)
        rows = torch.cat([mask, mask, mask])

        def sliced(tensor, *masks):
            return None if tensor is None else tensor[masks[0]] if len(masks) == 1 else tensor[masks[0]][:, masks[1]]
        tensors = (sliced(self.in_proj_weight, rows, mask), sliced(self.in_proj_bias, rows),
                   sliced(self.out_proj.weight, mask, mask), sliced(self.out_proj.bias, mask),
                   None if self.bias_k is None else self.bias_k[..., mask],
                   None if self.bias_v is None else self.bias_v[..., mask])
        return attention_forward(self, tensors, query, key, value, **options)


class ReferenceGroupNorm(nn.GroupNorm, _ReferenceNorm):
    """GroupNorm with sliced affine parameters; the group count stays (channels are pruned evenly per group)."""

    @classmethod
    def convert_from(cls, norm: nn.GroupNorm) -> "ReferenceGroupNorm":
        layer = _adopt(norm, cls)
        layer._init_norm_container(norm.num_channels)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return masked_group_norm(self, self._feature_mask(x.device), x)


# Most specific first: the swap walks this list and takes the first matching base type.
_REFERENCE_TYPES = (
    (nn.Conv2d, ReferenceConv2d),
    (nn.Linear, ReferenceLinear),
    (nn.BatchNorm1d, ReferenceBatchNorm1d),
    (nn.BatchNorm2d, ReferenceBatchNorm2d),
    (nn.LayerNorm, ReferenceLayerNorm),
    (nn.GroupNorm, ReferenceGroupNorm),
    (nn.MultiheadAttention, ReferenceMultiheadAttention),
)

REFERENCE_LAYERS = tuple(ref for _, ref in _REFERENCE_TYPES)


def to_reference_layer(module: nn.Module, name: str = "") -> nn.Module:
    """A reference layer sharing ``module``'s parameters and buffers, with all channels active."""
    for base, reference in _REFERENCE_TYPES:
        if isinstance(module, base):
            layer = reference.convert_from(module)
            layer.pyprune_name = name
            return layer
    raise ConfigError(f"{name or type(module).__name__}: no mmrazor-style reference layer for "
                      f"{type(module).__name__}")


def reference_from_op(op: nn.Module, name: str = "") -> nn.Module:
    """A reference layer for one DynamicOp, sharing its parameters, with masks equal to its current selection."""
    name = name or getattr(op, "pyprune_name", "") or type(op).__name__
    layer = to_reference_layer(op, name)
    _check_or_fill_masks(name, layer, op, from_units=False)
    return layer


def _index_to_mask(index: Optional[Tensor], num_channels: int) -> Tensor:
    mask = torch.ones(num_channels).bool()
    if index is not None:
        mask = torch.zeros(num_channels).bool()
        mask[index.detach().cpu().reshape(-1)] = True
    return mask


def _global_in_index(op: nn.Module) -> Optional[Tensor]:
    """The op's in selection as global channel indices (a grouped conv may hold the ``[G, K]`` local form)."""
    index = op.in_index
    if index is None or index.dim() == 1:
        return index
    groups, _ = index.shape
    per_group = op.in_channels // groups
    offsets = torch.arange(groups, device=index.device).unsqueeze(1) * per_group
    return (index + offsets).reshape(-1)


class ReferenceModel:
    """A model made of reference layers plus the host-side masks that drive them.

    ``model``: the converted ``nn.Module``. ``unit_channels``: unit name -> :class:`MaskChannel` (empty when built
    without a mutator; then every layer has its own single mask taken from the DynamicOp).
    """

    def __init__(self, model: nn.Module, unit_channels: Dict[str, MaskChannel], slots: List[Tuple[object, object]]):
        self.model = model
        self.unit_channels = unit_channels
        self.slots = slots  # (ChannelParameter / ChannelCount of the copy, MaskContainer driving it)

    def set_unit_prefixes(self, counts: Dict[str, int]) -> None:
        """Switch subnet the way an mmrazor sequential unit does: a fresh host mask per unit, prefix kept."""
        for name, count in counts.items():
            self.unit_channels[name].set_prefix(count)
        self._sync_slots()

    def set_unit_masks(self, masks: Dict[str, Tensor]) -> None:
        for name, mask in masks.items():
            self.unit_channels[name].set_mask(mask)
        self._sync_slots()

    def _sync_slots(self) -> None:
        """Channel tensors / width attributes (no mmrazor counterpart) follow their masks: mask -> nonzero index."""
        for slot, container in self.slots:
            mask = container.current_mask
            slot.set_out_index(None if bool(mask.all()) else mask.nonzero().squeeze(1).to(slot.device))


def _dynamic_op_types() -> Tuple[type, ...]:
    from ... import ops  # imported lazily: the bench package must import without the ops package built
    return tuple(ops.DYNAMIC_OPS.values())


def build_reference_model(model: nn.Module, mutator=None) -> ReferenceModel:
    """Copy a pyprune-prepared ``model`` and swap each DynamicOp for its mmrazor-style reference layer.

    With ``mutator`` (a prepared ``ChannelMutator``), each unit becomes one shared :class:`MaskChannel` registered
    on the ranges its ``ChannelRef`` s name, as mmrazor registers a unit's mutable channel into the containers of
    its layers; the result is checked against every DynamicOp's own selection. Without one, each layer gets a
    single mask equal to its DynamicOp's current selection (a fixed subnet). ``model`` itself is left unchanged.
    """
    dynamic_types = _dynamic_op_types()
    reference = copy.deepcopy(model)
    dynamic_ops = {name: m for name, m in reference.named_modules() if isinstance(m, dynamic_types)}
    layers = {name: to_reference_layer(op, name) for name, op in dynamic_ops.items()}

    from ...ops import channel_parameters
    slot_containers = {slot.pyprune_name: (slot, MaskContainer(slot.num_channels))
                       for slot in channel_parameters(reference)}
    unit_channels: Dict[str, MaskChannel] = {}
    if mutator is not None:
        unit_channels = _register_units(layers, slot_containers, mutator)
    for name, op in dynamic_ops.items():
        _check_or_fill_masks(name, layers[name], op, from_units=mutator is not None)
    for name, layer in layers.items():
        _set_submodule(reference, name, layer)
    slots = list(slot_containers.values()) if mutator is not None else []  # without units: the copy's own index
    return ReferenceModel(reference, unit_channels, slots)


def _register_units(layers: Dict[str, nn.Module], slot_containers: Dict[str, tuple],
                    mutator) -> Dict[str, MaskChannel]:
    unit_channels = {}
    for unit in mutator.units:
        channel = MaskChannel(unit.num_channels, unit.groups)
        channel.set_mask(unit.current_mask)
        unit_channels[unit.name] = channel
        for ref in list(unit.output_related) + list(unit.input_related):
            layer = layers.get(ref.name)
            if layer is not None:
                container = layer.out_container if ref.is_output_channel else layer.in_container
            elif ref.name in slot_containers:
                container = slot_containers[ref.name][1]
            else:
                continue  # a pass-through or non-dynamic module: it holds no mask
            expand = getattr(ref, "expand", 1)
            container.register(channel if expand == 1 else ExpandedMaskChannel(channel, expand), ref.start, ref.end)
    return unit_channels


def _check_or_fill_masks(name: str, layer: nn.Module, op: nn.Module, from_units: bool) -> None:
    """Make ``layer``'s masks equal ``op``'s selection: verify the unit-built ones, or set them directly."""
    is_norm = isinstance(layer, _ReferenceNorm)
    wanted = [("out", layer.out_container, op.out_index)]
    if not is_norm:
        wanted.append(("in", layer.in_container, _global_in_index(op)))
    for side, container, index in wanted:
        expected = _index_to_mask(index, container.num_channels)
        if not from_units:
            single = MaskChannel(container.num_channels)
            single.set_mask(expected)
            container.pieces = {(0, container.num_channels): single}
        elif not torch.equal(container.current_mask, expected):
            raise ConfigError(f"{name}: the reference {side}-channel mask assembled from the mutator's units "
                              f"does not match the DynamicOp's selection")


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def reference_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, layer) for every reference layer in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, REFERENCE_LAYERS)]


def iter_masks(model: nn.Module) -> Iterable[Tuple[str, Tensor, Tensor]]:
    """(name, in_mask, out_mask) of every reference layer (host tensors), for inspection and tests."""
    for name, layer in reference_layers(model):
        yield name, layer.in_container.current_mask, layer.out_container.current_mask
