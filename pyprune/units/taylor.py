"""TaylorMutableChannelUnit: keeps the channels whose removal would change the loss most (first-order Taylor)."""
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from .. import ops
from ..errors import ConfigError
from .importance import ImportanceMutableChannelUnit, per_unit_channel
from .registry import register_unit


@register_unit
class TaylorMutableChannelUnit(ImportanceMutableChannelUnit):
    """Importance of a channel = ``|sum(grad * param)|`` over the parameters it owns, accumulated over batches.

    "Owns" = the output-related layers' rows for that channel: conv / linear weight rows and biases, norm
    ``gamma`` / ``beta``. Their products are summed over all coupled layers *before* the absolute value (zeroing the
    channel removes all of them at once), then accumulated over calls of :meth:`update_importance`, which the
    training loop makes after ``loss.backward()``. Until the first update the first channels are kept.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._importance: Optional[Tensor] = None
        self.num_updates = 0

    def reset_importance(self) -> None:
        self._importance, self.num_updates = None, 0

    @torch.no_grad()
    def update_importance(self) -> None:
        """Add this backward pass's ``|sum(grad * param)|`` per channel (layers without gradients are skipped)."""
        step = None
        for ref, module in self.output_layers():
            if ops.holds_compact(module):  # its gradients are compact: rows would not line up with the unit's channels
                self._fail(f"layer {ref.name!r} is in compact training mode; Taylor importance needs full-size "
                           f"gradients: update it inside the session's paused() block or outside compact mode "
                           f"(ItePruneAlgorithm does this itself)")
            for param in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if param is None or param.grad is None:
                    continue
                product = (param.grad * param)[ref.start:ref.end].float()
                rows = product.flatten(1).sum(1) if product.dim() > 1 else product
                contribution = per_unit_channel(rows, self.num_channels)
                step = contribution if step is None else step + contribution.to(step.device)
        if step is None:
            return
        step = step.abs()
        self._importance = step if self._importance is None else self._importance + step.to(self._importance.device)
        self.num_updates += 1

    def channel_importance(self) -> Optional[Tensor]:
        return self._importance

    def importance_state_dict(self) -> Dict[str, Any]:
        """``{'importance': float [num_channels] on the CPU or None, 'num_updates': int}`` for checkpoints."""
        importance = None if self._importance is None else self._importance.detach().cpu().clone()
        return {"importance": importance, "num_updates": self.num_updates}

    def load_importance_state_dict(self, state: Dict[str, Any]) -> None:
        importance = state.get("importance")
        if importance is not None and tuple(importance.shape) != (self.num_channels,):
            raise ConfigError(f"unit {self.name}: saved importance has shape {tuple(importance.shape)}, expected "
                              f"({self.num_channels},)")
        self._importance = None if importance is None else importance.to(self.device, torch.float32)
        self.num_updates = int(state.get("num_updates", 0))
