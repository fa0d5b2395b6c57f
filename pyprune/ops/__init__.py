"""DynamicOps: torch layers that compute with a selected subset of their channels, and export to plain layers.

See docs/ARCHITECTURE.md ("pyprune.ops") for the contract and ``base.DynamicChannelMixin`` for the shared state.
"""
from .attention import ATTENTION_TYPES, DynamicMultiheadAttention
from .base import DynamicChannelMixin
from .batchnorm import DynamicBatchNorm1d, DynamicBatchNorm2d, DynamicBatchNorm3d
from .channel_norm import DynamicChannelNorm
from .conv import DynamicConv1d, DynamicConv2d, DynamicConv3d
from .embedding import DynamicEmbedding
from .fuse_conv import FuseConv1d, FuseConv2d, FuseConv3d
from .groupnorm import DynamicGroupNorm
from .layernorm import DynamicLayerNorm, is_channels_first_layer_norm
from .linear import DynamicLinear
from .parameter import ChannelCount, ChannelParameter, channel_parameter, channel_parameters, export_channel_parameters
from .read_layers import ReadCalls, read_layers, release_read_layers, serve_read_layers
from .layer_kind import LayerKind
from .registry import DYNAMIC_OPS, is_prunable_layer, layer_kind, register_layer_kind, registered_base, to_dynamic
from .tied import retie_exported
from .compact import CompactTraining, compact_training, holds_compact
from .batched import BatchedGather, batched_gather
from .switchable_bn import SwitchableBatchNorm2d

__all__ = ["DynamicChannelMixin", "DynamicConv1d", "DynamicConv2d", "DynamicConv3d", "DynamicLinear",
           "DynamicBatchNorm1d", "DynamicBatchNorm2d", "DynamicBatchNorm3d", "DynamicLayerNorm", "DynamicGroupNorm",
           "DynamicMultiheadAttention", "DynamicEmbedding", "DynamicChannelNorm", "retie_exported", "DYNAMIC_OPS", "LayerKind", "register_layer_kind", "to_dynamic", "layer_kind", "registered_base", "is_prunable_layer",
           "is_channels_first_layer_norm", "ChannelParameter", "ChannelCount", "channel_parameter",
           "channel_parameters", "export_channel_parameters", "ATTENTION_TYPES", "CompactTraining", "compact_training", "holds_compact", "BatchedGather", "batched_gather"]
__all__ += ["serve_read_layers", "read_layers", "release_read_layers", "ReadCalls"]
__all__ += ["FuseConv1d", "FuseConv2d", "FuseConv3d"]
__all__ += ["SwitchableBatchNorm2d"]
