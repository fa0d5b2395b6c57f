"""The last safety net of ``prepare_from_supernet``: the prepared model must run narrower than it was traced.

The tracer proves what it can see. What it cannot see - a size a recorded forward only shows as a plain number
(``C // self.num_heads`` of the residual width shaping another layer's output, timm's CrossViT / Twins / ConViT) -
could still break the first forward at a smaller width. So after preparing, the mutator runs the demo input once
with every mutable unit at half its width (eval mode, no gradient, random state untouched); if that forward raises,
the units whose narrowing breaks it are found by halving the set, fixed with a :class:`PruningTraceWarning` that
names the unit and the error (``strict=True`` raises instead), and the check repeats until the forward runs.
A model that does not run on its demo input at full width is not checked (the tracer has said why).
"""
import warnings
from typing import Callable, List, Sequence

import torch
from torch import nn

from ..errors import UntraceableOpError
from ..ops.selection import prefix_index
from ..tracing import PruningTraceWarning
from ..tracing.example_inputs import CallArgs, call_model

__all__ = ["fix_units_that_break_narrow"]


def _runs(model: nn.Module, inputs: CallArgs) -> Exception:
    """None when ``model`` runs on ``inputs`` (eval, no grad), else the exception."""
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            call_model(model, inputs)
    except Exception as error:  # the model's own code: any exception means "does not run"
        return error
    return None


def fix_units_that_break_narrow(model: nn.Module, units: Sequence, inputs: CallArgs, half_count: Callable,
                                strict: bool) -> List[str]:
    """Fix the mutable ``units`` whose narrowing to ``half_count(unit)`` channels breaks ``model`` on ``inputs``;
    every unit gets its width back afterwards. Returns the names of the units fixed."""
    mutable = [u for u in units if u.is_mutable and half_count(u) < u.num_channels]
    if not mutable:
        return []
    was_training = model.training
    kept = {id(u): u.active_channels for u in mutable}
    model.eval()
    try:
        # the narrowed forward first: it is the common case, and a quarter of the full forward's cost in a conv net
        error = _narrowed_error(model, mutable, inputs, half_count, kept)
        if error is None:
            return []
        if _runs(model, inputs) is not None:  # not even the full width runs: nothing to learn from narrowing
            return []
        fixed: List[str] = []
        while True:
            culprits = _culprits(model, mutable, inputs, half_count, kept) or mutable[:1]
            for unit in culprits:
                message = (f"unit {unit.name}: the prepared model does not run with it narrower ("
                           f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
                           f"the unit is not pruned")
                if strict:
                    raise UntraceableOpError(f"{message}. Exclude its layers with fixed=[...] or prepare without "
                                             f"strict=True")
                warnings.warn(message, PruningTraceWarning, stacklevel=4)
                unit.fix("the model does not run with it narrower")
                fixed.append(unit.name)
            mutable = [u for u in mutable if u.is_mutable]
            error = _narrowed_error(model, mutable, inputs, half_count, kept)
            if error is None:
                return fixed
    finally:
        for unit in mutable:
            if unit.is_mutable:
                unit.apply_count(kept[id(unit)])
        model.train(was_training)


def _narrowed_error(model, subset, inputs, half_count, kept):
    """The error of a forward with ``subset`` narrowed (None when it runs); widths restored after. Each unit keeps
    its first channels: which ones does not change a shape, and ranking them (an L1 unit reads every weight) would
    cost more than the check."""
    for unit in subset:
        unit.apply_index(prefix_index(half_count(unit), unit.num_channels, unit.groups, unit.device))
    try:
        return _runs(model, inputs)
    finally:
        for unit in subset:
            unit.apply_count(kept[id(unit)])


def _culprits(model, subset, inputs, half_count, kept) -> list:
    """Units that break the forward narrowed on their own (found by halving ``subset``, whose narrowing as a whole
    is known to break it: the caller has just run that forward)."""
    if len(subset) == 1:
        return list(subset)
    middle = len(subset) // 2
    found = []
    for half in (subset[:middle], subset[middle:]):
        if _narrowed_error(model, half, inputs, half_count, kept) is not None:
            found += _culprits(model, half, inputs, half_count, kept)
    return found
