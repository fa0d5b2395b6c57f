"""DynamicConv1D: HuggingFace's ``transformers.pytorch_utils.Conv1D`` (GPT-2's transposed linear) over the active
features.

``Conv1D(nf, nx)`` holds ``weight`` ``[nx, nf]`` (input features are its *rows*, output features its *columns*: the
transpose of ``nn.Linear``'s) and ``bias`` ``[nf]``, and computes ``addmm(bias, x.view(-1, nx), weight)``. Importing
this module imports transformers; the registry lists the type only once transformers is imported (a model holding
a Conv1D has imported it), so ``import pyprune`` does not pay for it.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .base import DynamicChannelMixin, autocast_dtype
from .compact_state import ChannelSlice
from .cost_terms import CostTerms, LayerCall, matmul_cost_terms

__all__ = ["DynamicConv1D", "LAYER_OPS"]


class DynamicConv1D(DynamicChannelMixin, Conv1D):
    """``Conv1D`` computing only the selected features: x ``[*, K_in]`` -> ``[*, K_out]`` with the compact weight
    ``[K_in, K_out]`` (rows: kept input features, columns: kept output features) and bias ``[K_out]``."""

    _torch_type = Conv1D
    _channel_tensors = ("weight", "bias")

    @classmethod
    def channel_counts(cls, module: nn.Module) -> Tuple[int, int]:
        return module.nf, module.nx

    @classmethod
    def importance_rows(cls, module: nn.Module) -> Optional[Tensor]:
        """The weight transposed, ``[nf, nx]``: one row per output feature, as for ``nn.Linear``."""
        return cls.full_tensor(module, "weight").t()

    @classmethod
    def probe_inputs(cls, module: nn.Module):
        return [((2, 3, module.nx), -1)]

    @classmethod
    def cost_terms(cls, module: nn.Module, calls: Sequence[LayerCall]) -> CostTerms:
        return matmul_cost_terms(module, calls, module.nf)  # addmm: as nn.Linear, weight stored transposed

    def active_attributes(self):
        return {"nf": self.active_out_channels, "nx": self.active_in_channels}

    def _channel_dims(self, x: Tensor) -> Tuple[int, str]:
        return x.dim() - 1, "features"

    def _compact_layout(self) -> List[ChannelSlice]:
        """weight ``[nx, nf]``: rows = kept inputs, columns = kept outputs; bias: the kept outputs."""
        out_index, in_index = self._out_index, self._in_index
        weight, bias = self._source_tensors()
        layout = []
        if out_index is not None or in_index is not None:
            layout.append(ChannelSlice("weight", weight, in_index, out_index))
        if out_index is not None and bias is not None:
            layout.append(ChannelSlice("bias", bias, out_index))
        return layout

    def _gather_form(self, x: Tensor):
        """(autocast dtype, None) under autocast, so the compact weight is gathered straight into it; else None."""
        dtype = autocast_dtype(x)
        return None if dtype is None else (dtype, None)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        weight, bias = self.active_tensors(x)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
        return out.view(*x.shape[:-1], self.active_out_channels)

    def _static_module(self) -> Conv1D:
        with torch.device("meta"):
            static = Conv1D(self.active_out_channels, self.active_in_channels)
        if self.bias is None:  # a Conv1D whose bias someone removed
            static.bias = None
        return static


# torch layer type -> DynamicOp type, merged into pyprune.ops.DYNAMIC_OPS once transformers is imported
LAYER_OPS = {Conv1D: DynamicConv1D}
