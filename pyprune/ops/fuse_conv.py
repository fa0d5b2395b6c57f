"""FuseConv1d / FuseConv2d / FuseConv3d: convolutions whose kept filters are fusions of all the layer's filters.

Dynamic-coded filter fusion (DCFF, Lin et al. 2021) does not keep a pruned conv's best filters as they are: each
kept filter ``c`` is the weighted average ``sum_j P[c, j] * W[j]`` of *every* filter of the layer, with weights
``P[c]`` (a softmax over filter distances, see :mod:`pyprune.units.dcff`) that a unit sets and replaces as training
goes on. The op holds ``P`` as a full ``[C_out, C_out]`` matrix, the identity outside the blocks units have set, so
any selection of output channels reads its rows: the compact weight is ``P[out_index] @ W[:, in_index]``
(``[K_out, K_in / groups, *kernel]``), the bias ``P[out_index] @ b``. The gradient reaches every filter through the
fusion, pruned or not; ``P`` itself is a constant (no gradient), as in mmrazor's ``FuseConv2d``.

The fusion is one override of the gather (:meth:`_gather_compact`), so everything that asks the op's tensor provider
for its tensors gets the fused ones: the forward, the eval cache (cleared whenever ``P`` changes) and
:meth:`export` (the plain ``nn.Conv2d`` holds the fused filters, so the exported subnet computes what the dynamic
model computes). Without a fusion (no block set) the op is exactly its DynamicConv.

Fused filters need every filter's full-size weight, so an op with a fusion refuses compact training mode (whose
held tensors are the kept filters alone) and ignores the batched gather's hand-off (a plain slice). Fusion is
defined for ``groups == 1`` and depthwise convs, as in mmrazor; other grouped convs are refused.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import kernels
from ..errors import ConfigError
from .conv import DynamicConv1d, DynamicConv2d, DynamicConv3d

__all__ = ["FuseConv1d", "FuseConv2d", "FuseConv3d", "FUSE_CONV_OPS", "can_fuse"]


def can_fuse(conv: nn.Module) -> bool:
    """Whether a conv's filters can be fused: ``groups == 1``, or depthwise (one filter per input channel)."""
    return conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels


class _FuseConvMixin:
    """The fusion state and the fused gather, mixed in before a DynamicConv class (see the module docstring)."""

    def _init_selection(self) -> None:
        super()._init_selection()
        state = self.__dict__  # plain attributes: not parameters, not buffers, not in the state_dict
        state["_fusion"] = None          # [C_out, C_out] (float, no grad) or None: no fusion
        state["_fusion_blocks"] = {}     # (start, end) -> [end - start, end - start], the blocks units set

    # ---------------------------------------------------------------------------------------------------- state
    @property
    def fusion(self) -> Optional[Tensor]:
        """The fusion matrix ``[C_out, C_out]`` (row ``c``: the weights of the filters that make filter ``c``), or
        None when no unit set one."""
        return self._fusion

    @property
    def fusion_blocks(self) -> Dict[Tuple[int, int], Tensor]:
        """``{(start, end): block [end - start, end - start]}``: the output channel ranges with a fusion."""
        return dict(self._fusion_blocks)

    def set_fusion(self, start: int, end: int, block: Optional[Tensor]) -> None:
        """Fuse output channels ``[start, end)`` with ``block`` (float ``[end - start, end - start]``, row ``i``: the
        weights of filters ``start..end`` in fused filter ``start + i``; detached), or stop fusing them (None).
        Bad ranges / shapes raise ConfigError naming the layer; nothing changes then."""
        where = f"{self.pyprune_name} ({type(self).__name__})"
        if not can_fuse(self):
            raise ConfigError(f"{where}: filters of a grouped conv (groups={self.groups}) cannot be fused; only "
                              f"groups=1 and depthwise convs can")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= self.out_channels):
            raise ConfigError(f"{where}: fusion range [{start!r}, {end!r}) is not inside its {self.out_channels} "
                              f"output channels")
        blocks = dict(self._fusion_blocks)
        if block is None:
            blocks.pop((start, end), None)
        else:
            size = end - start
            if not isinstance(block, Tensor) or tuple(block.shape) != (size, size) or not block.is_floating_point():
                what = (f"{tuple(block.shape)} {block.dtype}" if isinstance(block, Tensor)
                        else type(block).__name__)
                raise ConfigError(f"{where}: a fusion block for channels [{start}, {end}) must be a float tensor "
                                  f"[{size}, {size}], got {what}")
            overlapping = [key for key in blocks if key != (start, end) and key[0] < end and start < key[1]]
            if overlapping:
                raise ConfigError(f"{where}: fusion range [{start}, {end}) overlaps the ranges {overlapping} that "
                                  f"are fused already")
            blocks[(start, end)] = block.detach()
        self._install_fusion(blocks)

    def clear_fusion(self) -> None:
        """No fusion: the op computes with the kept filters as they are again."""
        self._install_fusion({})

    def _install_fusion(self, blocks: Dict[Tuple[int, int], Tensor]) -> None:
        fusion = None
        if blocks:
            weight = self.weight
            fusion = torch.eye(self.out_channels, device=weight.device, dtype=torch.float32)
            for (start, end), block in blocks.items():
                fusion[start:end, start:end] = block.to(device=weight.device, dtype=torch.float32)
        state = self.__dict__
        state["_fusion_blocks"], state["_fusion"] = blocks, fusion
        provider = self.tensor_provider
        provider.clear_cache()  # the cached compact weight was made with the old fusion
        provider.drop_handed()

    # --------------------------------------------------------------------------------------------------- gather
    def active_tensors(self, x: Optional[Tensor] = None):
        if self._fusion is not None:
            provider = self.tensor_provider
            if provider.source is not None:
                raise ConfigError(f"{self.pyprune_name} ({type(self).__name__}): fused filters need every filter's "
                                  f"full-size weight, but compact training mode holds the kept filters alone; "
                                  f"train with fused filters in gather mode (stop compact training)")
            provider.drop_handed()  # a batched gather's plain slice is not the fused weight
        return super().active_tensors(x)

    def _gather_compact(self, form=None) -> Tuple[Optional[Tensor], ...]:
        """``(weight [K_out, K_in / groups, *kernel], bias [K_out] or None)`` with the fused filters (a fresh
        tensor, differentiable w.r.t. the full weight and bias); the plain gather without a fusion."""
        fusion = self._fusion
        if fusion is None:
            return super()._gather_compact(form)
        weight, bias = self.weight, self.bias
        rows = self._out_index
        cols = self._grouped_in_index  # None for depthwise: its one input column per filter
        # every filter, at the kept input channels: [C_out, K_in / groups, *kernel]
        filters = weight if cols is None else kernels.gather_channels(weight, None, cols)
        mix = fusion if rows is None else fusion.index_select(0, rows)  # [K_out, C_out]
        mix = mix.to(dtype=filters.dtype)
        fused = (mix @ filters.flatten(1)).view(mix.shape[0], *filters.shape[1:])
        fused_bias = None if bias is None else mix.to(bias.dtype) @ bias
        if form is not None:
            dtype, memory_format = form
            if dtype is not None and fused.dtype != torch.float64:
                fused = fused.to(dtype)
                fused_bias = None if fused_bias is None else fused_bias.to(dtype)
            if memory_format is not None and fused.dim() == {torch.channels_last: 4,
                                                             torch.channels_last_3d: 5}[memory_format]:
                fused = fused.contiguous(memory_format=memory_format)
        return fused, fused_bias

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.cuda()``: the fusion follows the weight's device."""
        result = super()._apply(fn, *args, **kwargs)
        if self._fusion is not None:
            self._install_fusion(self._fusion_blocks)
        return result

    def extra_repr(self) -> str:
        fused = ", ".join(f"[{s}, {e})" for s, e in sorted(self._fusion_blocks))
        return super().extra_repr() + (f", fused={fused}" if fused else "")


class FuseConv1d(_FuseConvMixin, DynamicConv1d):
    """``DynamicConv1d`` with fused filters: x ``[N, K_in, L]`` -> ``[N, K_out, L']``. See the module docstring."""


class FuseConv2d(_FuseConvMixin, DynamicConv2d):
    """``DynamicConv2d`` with fused filters (mmrazor's ``FuseConv2d``): x ``[N, K_in, H, W]`` ->
    ``[N, K_out, H', W']``. See the module docstring."""


class FuseConv3d(_FuseConvMixin, DynamicConv3d):
    """``DynamicConv3d`` with fused filters: x ``[N, K_in, D, H, W]`` -> ``[N, K_out, D', H', W']``."""


# the DynamicConv a plain conv becomes -> its fusing counterpart
FUSE_CONV_OPS = {DynamicConv1d: FuseConv1d, DynamicConv2d: FuseConv2d, DynamicConv3d: FuseConv3d}
