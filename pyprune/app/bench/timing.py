"""Timing primitives shared by the op- and model-level benchmarks.

CPU: ``time.perf_counter`` around each repetition. CUDA: a pair of CUDA events per repetition (device time, no host
overhead hidden by a trailing sync), then one synchronize to read them. The reported number is the median over
repetitions taken after warm-up, so a stray slow repetition (the machine is shared, a compile, an allocator grow)
does not move it.
"""
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch


@dataclass
class Measurement:
    """Seconds per call of one timed callable.

    ``times_s``: one entry per repetition (each the mean over ``inner`` calls); ``median_s``: their median;
    ``syncs_per_call``: host<->device synchronisations one call performs (CUDA only, ``None`` on CPU).
    """
    times_s: List[float]
    syncs_per_call: Optional[float] = None
    inner: int = 1
    median_s: float = field(init=False)

    def __post_init__(self):
        self.median_s = statistics.median(self.times_s)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Host<->device synchronisations performed by one call of ``fn`` (``None`` off CUDA).

    Runs ``fn`` once under ``torch.cuda.set_sync_debug_mode("warn")``, which emits one ``UserWarning`` per
    synchronising CUDA call (``.item()``, boolean-mask indexing via ``nonzero``, pageable host->device copies ...),
    and counts those warnings.
    """
    if device.type != "cuda":
        return None
    synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    synchronize(device)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 5, inner: int = 1,
            syncs: bool = True) -> Measurement:
    """Time ``fn`` on ``device``: ``warmup`` untimed calls, then ``reps`` repetitions of ``inner`` calls each."""
    if reps < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"measure: need reps >= 1, inner >= 1, warmup >= 0 (got {reps}, {inner}, {warmup})")
    for _ in range(warmup):
        fn()
    synchronize(device)
    sync_count = count_syncs(fn, device) if syncs else None
    times = _time_cuda(fn, device, reps, inner) if device.type == "cuda" else _time_host(fn, reps, inner)
    return Measurement(times_s=times, syncs_per_call=sync_count, inner=inner)


def _time_host(fn: Callable[[], object], reps: int, inner: int) -> List[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return times


def _time_cuda(fn: Callable[[], object], device: torch.device, reps: int, inner: int) -> List[float]:
    # Record all events first and synchronise once, so the host never waits between repetitions.
    with torch.cuda.device(device):
        pairs = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 / inner for start, end in pairs]
