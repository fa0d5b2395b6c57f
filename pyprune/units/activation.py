"""ActivationMutableChannelUnit: keeps the channels whose outputs are largest on calibration data (Minitron-style)."""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError
from .importance import ImportanceMutableChannelUnit
from .registry import register_unit

METRICS = {
    "l1": "mean |activation| over every position of every calibration batch (Minitron's activation magnitude)",
    "l2": "mean squared activation over every position of every calibration batch",
}


def reduce_activation(output: Tensor, dim: int, metric: str) -> Tensor:
    """``[..., C at dim, ...] -> float64 [C]``: the sum over every other dim of ``|y|`` (``'l1'``) or ``y ** 2``
    (``'l2'``); divided by ``output.numel() // C`` later, once all batches are in."""
    values = output.detach().to(torch.float64)
    values = values.abs() if metric == "l1" else values.square()
    others = [d for d in range(values.dim()) if d != dim]
    return values.sum(others) if others else values


@register_unit
class ActivationMutableChannelUnit(ImportanceMutableChannelUnit):
    """Importance of a channel = how large the coupled layers' outputs are there, on calibration batches.

    :func:`pyprune.units.calibrate` runs the batches with forward hooks on the unit's output-related layers (conv /
    linear / norm / embedding / attention outputs at the unit's channels). Per layer, the statistic of ``metric``
    (see :data:`METRICS`) is averaged per unit channel (its ``expand`` layer channels together), scaled to mean 1
    over the channels seen, so that every coupled layer has the same say whatever its output scale (as L1 does for
    weights), and summed over the layers. A calibration overwrites the score of the channels it saw; channels pruned
    at the time keep their last score (0 if they were never seen). Until the first calibration (or
    :func:`pyprune.units.load_scores`) the first channels are kept.

    The score does not change with the weights between calibrations: re-run :func:`calibrate` when it should.
    """

    def __init__(self, *args, metric: str = "l1", **kwargs):
        super().__init__(*args, **kwargs)
        if metric not in METRICS:
            raise ConfigError(f"unit {self.name}: metric must be one of {sorted(METRICS)}, got {metric!r}")
        self.metric = metric
        self._score: Optional[Tensor] = None  # float32 [num_channels] on the layers' device
        self.num_calibrations = 0

    @property
    def init_args(self):
        return {**super().init_args, "metric": self.metric}

    def channel_importance(self) -> Optional[Tensor]:
        if self._score is not None and self._score.device != self.device:
            self._score = self._score.to(self.device)
        return self._score

    @property
    def scores(self) -> Optional[Tensor]:
        """The accumulated score, float32 ``[num_channels]`` (a copy on the CPU), or None before calibration."""
        return None if self._score is None else self._score.detach().cpu().clone()

    def absorb(self, layer_stats: Dict[str, Tuple[Tensor, Tensor]]) -> bool:
        """Take one calibration run's statistics: ``{layer name: (sum float64 [full out], count float64 [full out])}``
        per layer channel (count = number of values summed; 0 where the channel was pruned). Returns whether any of
        the unit's output layers ran."""
        new, seen = None, None
        for ref, _module in self.output_layers():
            if ref.name not in layer_stats:
                continue
            total, count = (t[ref.start:ref.end].reshape(self.num_channels, -1).sum(1) for t in layer_stats[ref.name])
            here = count > 0
            if not bool(here.any()):  # this layer did not run during the calibration
                continue
            mean = torch.where(here, total / count.clamp_min(1.0), torch.zeros_like(total))
            scale = mean[here].mean().clamp_min(torch.finfo(torch.float64).tiny)
            new = mean / scale if new is None else new + (mean / scale).to(new.device)
            seen = here if seen is None else seen & here.to(seen.device)
        if new is None:
            return False
        score = torch.zeros(self.num_channels, dtype=torch.float32, device=new.device) if self._score is None \
            else self._score.to(new.device)
        self._score = torch.where(seen, new.to(torch.float32), score)
        self.num_calibrations += 1
        return True

    def set_scores(self, scores: Tensor) -> None:
        """Use ``scores`` (float ``[num_channels]``, e.g. from a score file) as the accumulated score."""
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (self.num_channels,) \
                or not scores.is_floating_point():
            got = f"shape {tuple(scores.shape)} dtype {scores.dtype}" if isinstance(scores, Tensor) \
                else type(scores).__name__
            raise ConfigError(f"unit {self.name}: scores must be a float tensor of shape ({self.num_channels},), "
                              f"got {got}")
        self._score = scores.detach().to(self.device, torch.float32).clone()

    def reset_scores(self) -> None:
        """Forget every calibration (back to keeping the first channels)."""
        self._score, self.num_calibrations = None, 0
