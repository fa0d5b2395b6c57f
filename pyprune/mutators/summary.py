"""Parameter and FLOP counts of a model before and after pruning."""
from typing import Any, Dict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..tracing.example_inputs import as_call_args, call_model


class _GlobalOnly:
    """A stand-in for ``FlopCounterMode``'s module tracker that attributes every FLOP to ``'Global'`` and hooks
    nothing."""
    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


class TotalFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` counting the total only (``get_total_flops``; no per-module table).

    The stock counter's module tracker hooks the autograd graph of every module input that requires grad, and
    under ``no_grad`` a view of a parameter (a class token ``cls_token.expand(B, -1, -1)`` passed to a block, as
    timm's CaiT and PiT do) requires grad without a ``grad_fn``: the hook asserts before any FLOP is counted. The
    total needs no module attribution, so nothing is tracked.
    """

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _GlobalOnly()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, inputs) -> int:
    """FLOPs of one eval-mode forward (``FlopCounterMode``: 2 per multiply-add of conv / matmul) on ``inputs``, in
    any form :func:`pyprune.tracing.example_inputs.as_call_args` takes (``(x,)``: ``model(x)``).

    ``nn.MultiheadAttention``'s eval fast path is one fused op the counter does not see, so it is switched off while
    counting (a plain model's attention would otherwise count as free and an exported ViT look cheaper than it is).
    Counted by :class:`TotalFlopCounter` (no module tracking: the same total, for models whose blocks take a
    parameter's view as input too).
    """
    call = as_call_args(inputs, model=model)
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), TotalFlopCounter() as counter:
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
