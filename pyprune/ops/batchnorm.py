"""DynamicBatchNorm1d / 2d / 3d: batch norm over the active channels, running stats updated in place."""
from typing import Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .base import DynamicChannelMixin, NormLayerKind

__all__ = ["DynamicBatchNorm1d", "DynamicBatchNorm2d", "DynamicBatchNorm3d"]


class _DynamicBatchNorm(NormLayerKind, DynamicChannelMixin):
    """Batch norm over the active channels ``K``: x ``[N, K, *]``; one selection (in == out).

    Eval: normalises with the running stats of the active channels (compact copies, cached like the weights).

    Training: the batch statistics of the active channels update *their* running stats, in place in the
    full-size buffers; inactive channels keep theirs. We gather compact copies ``[K]`` of the running stats, let
    ``F.batch_norm`` update those copies, and write them back with ``kernels.update_running_stats_`` (one
    in-place scatter, no host sync). ``num_batches_tracked`` counts every training batch, and ``momentum=None``
    (cumulative average), ``track_running_stats=False`` and ``affine=False`` behave as in ``nn.BatchNorm``.

    Why not ``F.batch_norm(x, self.running_mean[mask], self.running_var[mask], ...)``: indexing by a mask (or
    an index) returns a *new* tensor. ``F.batch_norm`` updates the running stats in place, so the update lands in
    that temporary copy and is thrown away with it; the layer's buffers never learn from training. mmrazor
    therefore keeps the copy and writes it back with ``masked_scatter_``; ``update_running_stats_`` does the same
    write without the boolean mask (and its sync).
    """

    _channel_tensors = ("weight", "bias", "running_mean", "running_var")

    @classmethod
    def channel_counts(cls, module: nn.Module) -> Tuple[int, int]:
        return module.num_features, module.num_features

    _probe_ranks: Tuple[int, ...] = (4,)  # input ranks the type takes

    @classmethod
    def channelwise(cls, module: nn.Module) -> bool:
        return True

    @classmethod
    def probe_inputs(cls, module: nn.Module):
        return [((4, module.num_features) + (3,) * (rank - 2), 1) for rank in cls._probe_ranks]

    def active_attributes(self):
        return {"num_features": self.active_out_channels}

    def _channel_dims(self, x: Tensor) -> Tuple[int, str]:
        return 1, "channels"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        self._check_input(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            # as nn.BatchNorm: momentum=None means a cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        weight, bias, running_mean, running_var = self.active_tensors()
        tracking = not self.training or self.track_running_stats
        out = F.batch_norm(x, running_mean if tracking else None, running_var if tracking else None, weight, bias,
                           use_batch_stats, factor, self.eps)
        if self.training and self.track_running_stats:
            # F.batch_norm updated the compact statistics in place: into the full buffers with them
            self.carry_writes({"running_mean": running_mean, "running_var": running_var})
        return out

    def _static_module(self) -> nn.Module:
        return self._torch_type(self.active_out_channels, self.eps, self.momentum, self.affine,
                                self.track_running_stats, device="meta", **self._bias_kwargs())


class DynamicBatchNorm1d(_DynamicBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over the active channels: x ``[N, K]`` or ``[N, K, L]``. See ``_DynamicBatchNorm``."""

    _torch_type = nn.BatchNorm1d
    _probe_ranks = (2, 3)


class DynamicBatchNorm2d(_DynamicBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over the active channels: x ``[N, K, H, W]``. See ``_DynamicBatchNorm``."""

    _torch_type = nn.BatchNorm2d


class DynamicBatchNorm3d(_DynamicBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` over the active channels: x ``[N, K, D, H, W]``. See ``_DynamicBatchNorm``."""

    _torch_type = nn.BatchNorm3d
    _probe_ranks = (5,)
