"""Parameter and FLOP counts of a model before and after pruning."""
from typing import Any, Dict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..tracing.example_inputs import as_call_args, call_model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, inputs) -> int:
    """FLOPs of one eval-mode forward (``FlopCounterMode``: 2 per multiply-add of conv / matmul) on ``inputs``, in
    any form :func:`pyprune.tracing.example_inputs.as_call_args` takes (``(x,)``: ``model(x)``).

    ``nn.MultiheadAttention``'s eval fast path is one fused op the counter does not see, so it is switched off while
    counting (a plain model's attention would otherwise count as free and an exported ViT look cheaper than it is).
    """
    call = as_call_args(inputs, model=model)
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(model, call)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return int(counter.get_total_flops())


class PruningSummary(dict):
    """``params_before / params_after / params_kept`` and the same for ``flops``; ``print()`` gives a table."""

    def __str__(self) -> str:
        lines = [f"{'':8}{'before':>16}{'after':>16}{'kept':>9}"]
        for what in ("params", "flops"):
            before, after, kept = self[f"{what}_before"], self[f"{what}_after"], self[f"{what}_kept"]
            lines.append(f"{what:8}{before:>16,}{after:>16,}{kept:>8.1%}")
        return "\n".join(lines)

    def table(self) -> str:
        return str(self)


def make_summary(full: nn.Module, pruned: nn.Module, inputs) -> PruningSummary:
    counts: Dict[str, Any] = {}
    for what, count in (("params", lambda m: count_params(m)), ("flops", lambda m: count_flops(m, inputs))):
        before, after = count(full), count(pruned)
        counts[f"{what}_before"], counts[f"{what}_after"] = before, after
        counts[f"{what}_kept"] = after / before if before else 1.0
    return PruningSummary(counts)
