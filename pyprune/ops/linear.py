"""DynamicLinear: nn.Linear over the active input / output features."""
from typing import Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .base import DynamicChannelMixin, autocast_dtype
from .cost_terms import CostTerms, LayerCall, matmul_cost_terms

__all__ = ["DynamicLinear"]


class DynamicLinear(DynamicChannelMixin, nn.Linear):
    """``nn.Linear`` computing only the selected features: x ``[*, K_in]`` -> ``[*, K_out]`` with the compact
    weight ``[K_out, K_in]`` and bias ``[K_out]`` gathered from the full ones."""

    _torch_type = nn.Linear
    _channel_tensors = ("weight", "bias")

    @classmethod
    def channel_counts(cls, module: nn.Linear) -> Tuple[int, int]:
        return module.out_features, module.in_features

    @classmethod
    def importance_rows(cls, module: nn.Linear) -> Optional[Tensor]:
        return cls.full_tensor(module, "weight")

    @classmethod
    def probe_inputs(cls, module: nn.Linear):
        return [((2, 3, module.in_features), -1)]

    @classmethod
    def cost_terms(cls, module: nn.Linear, calls: Sequence[LayerCall]) -> CostTerms:
        return matmul_cost_terms(module, calls, module.out_features)

    def active_attributes(self):
        return {"out_features": self.active_out_channels, "in_features": self.active_in_channels}

    def _channel_dims(self, x: Tensor) -> Tuple[int, str]:
        return x.dim() - 1, "features"

    def _gather_form(self, x: Tensor):
        """(autocast dtype, None) under autocast, so the compact weight is gathered straight into it; else None."""
        dtype = autocast_dtype(x)
        return None if dtype is None else (dtype, None)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        weight, bias = self.active_tensors(x)
        return F.linear(x, weight, bias)

    def _static_module(self) -> nn.Linear:
        return nn.Linear(self.active_in_channels, self.active_out_channels, self.bias is not None, device="meta")
