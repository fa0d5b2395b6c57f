"""Measured latency of a model on the device it sits on (never estimated from FLOPs)."""
import statistics
import time
from dataclasses import dataclass
import torch
from torch import nn

from ..tracing.example_inputs import as_call_args, call_model, model_device, tensor_leaves

DEFAULT_WARMUP = 3
DEFAULT_REPEATS = 10


@dataclass(frozen=True)
class LatencySettings:
    """How a latency is measured: ``warmup`` untimed forwards, then the median of ``repeats`` timed forwards, in
    eval mode under ``torch.no_grad``; on CUDA ``torch.cuda.synchronize`` before starting and after each forward, so
    each time covers the kernels, not only their launch."""
    warmup: int = DEFAULT_WARMUP
    repeats: int = DEFAULT_REPEATS

    def __post_init__(self):
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"latency: need warmup >= 0 and repeats >= 1, got {self.warmup}, {self.repeats}")

    def describe(self, device: torch.device, inputs) -> str:
        """The method in words; ``inputs`` (any form of :mod:`pyprune.tracing.example_inputs`) by shapes."""
        shapes = ", ".join("x".join(str(d) for d in t.shape) for t in tensor_leaves(as_call_args(inputs)))
        sync = "; torch.cuda.synchronize around each" if device.type == "cuda" else ""
        return (f"median of {self.repeats} timed eval forwards (no_grad, input {shapes}) after {self.warmup} "
                f"warm-up forwards on {device}{sync}")


def measure_latency(model: nn.Module, inputs, settings: LatencySettings = LatencySettings()) -> float:
    """Seconds per forward of ``model`` on ``inputs`` (any form :func:`pyprune.tracing.example_inputs.as_call_args`
    takes; ``(x,)`` is ``model(x)``): the median over ``settings.repeats`` timed forwards."""
    device = model_device(model)
    call = as_call_args(inputs, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(settings.warmup):
                call_model(model, call)
            times = []
            for _ in range(settings.repeats):
                _synchronize(device)
                start = time.perf_counter()
                call_model(model, call)
                _synchronize(device)
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["LatencySettings", "measure_latency", "DEFAULT_WARMUP", "DEFAULT_REPEATS"]
