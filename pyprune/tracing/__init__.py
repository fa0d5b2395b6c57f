"""Parse a model into coupled channel groups (UnitSpecs): torch.fx first, a recorded real forward as fallback."""
from typing import Iterable, List

import torch
from torch import nn

from ..errors import ConfigError
from .capture import capture
from .example_inputs import as_call_args
from .heads import GQA_MODES
from .outputs import check_fixed_outputs
from .propagate import fix_modules, propagate
from .rules_layers import is_prunable_layer
from .spec import ChannelRef, PruningTraceWarning, UnitSpec, warn_untraceable
from .tied import couple_tied_tensors
from .unseen import handle_unseen

TRACERS = ("auto", "fx", "torch_function")

__all__ = ["trace_channel_units", "ChannelRef", "UnitSpec", "PruningTraceWarning", "is_prunable_layer", "TRACERS"]


def trace_channel_units(model: nn.Module, example_inputs, *,
                        fixed: Iterable[str] = (), strict: bool = False, tracer: str = "auto",
                        gqa: str = "keep_kv", fixed_outputs=None) -> List[UnitSpec]:
    """Find the groups of coupled channels of ``model``.

    Args:
        model: any ``nn.Module``; it is not modified (buffers a traced forward updates are restored).
        example_inputs: what the model is run on, in any form of :mod:`pyprune.tracing.example_inputs`: a tensor
            (e.g. ``[1, 3, H, W]``), a shape, a tuple of positional inputs, a list (detection's list of ``[3, H, W]``
            images, passed as one argument), a dict of keyword inputs, a DemoInput or a callable making one.
        fixed: module names whose input and output channels must not be pruned (submodules included).
        strict: raise :class:`~pyprune.errors.UntraceableOpError` on an op that cannot be mapped, or on layers the
            example input does not reach, instead of fixing the groups they touch with a
            :class:`PruningTraceWarning`.
        tracer: "fx", "torch_function" (record a real forward) or "auto" (fx, falling back to the recording).
        gqa: how grouped-query attention (fewer key / value heads than query heads) is pruned: "keep_kv" keeps
            every key / value head and drops the same number of query heads in every KV group; "drop_kv_groups"
            drops whole KV groups with their query heads (see :mod:`pyprune.tracing.heads`).
        fixed_outputs: which model outputs keep their channel count; the others may change it with the pruned
            model (the export equals the dynamic model on the fixed ones). None: every output, except the auxiliary
            fields of a transformers ``ModelOutput`` (``encoder_last_hidden_state``, CLIP's ``text_model_output`` /
            ``vision_model_output`` / ``text_embeds`` / ``image_embeds``, ``hidden_states``, ``attentions``, ...;
            the table is in :mod:`pyprune.tracing.outputs`); ``"all"``: every output; a list: the named fields (a
            dict / ``ModelOutput`` / NamedTuple field, a dotted path into nested ones, an int position of a tuple
            output), nothing else.

    Returns:
        one :class:`UnitSpec` per channel group that touches a prunable layer, in graph order; groups that must
        keep all their channels (model input / output, unmappable ops, ``fixed``, what layers the example input
        does not reach read or feed) have ``fixed=True`` and a reason. A tensor several layers hold (tied input /
        output embeddings) is pruned by one unit per dim: their units merge, or are fixed where they cannot.

    Raises:
        ConfigError: the model does not run on ``example_inputs``; the message names the failing layer and, where
            one is found, a larger input that runs. A ``fixed_outputs`` name that is no output field (the message
            lists the fields).
    """
    if tracer not in TRACERS:
        raise ConfigError(f"unknown tracer {tracer!r}; known: {list(TRACERS)}")
    if gqa not in GQA_MODES:
        raise ConfigError(f"unknown gqa mode {gqa!r}; known: {list(GQA_MODES)}")
    fixed_outputs = check_fixed_outputs(fixed_outputs)
    fixed = list(fixed)
    known = {name for name, _ in model.named_modules()}
    missing = [name for name in fixed if name not in known]
    if missing:
        raise ConfigError(f"fixed: the model has no modules named {missing}")
    inputs = as_call_args(example_inputs, model=model)
    saved = {name: b.clone() for name, b in model.named_buffers()}  # a recorded train-mode forward updates BN stats
    try:
        captured = capture(model, inputs, tracer)
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
    if captured.note:
        warn_untraceable(captured.note)
    propagation = propagate(model, captured.graph, strict=strict, gqa=gqa,
                            recorded=captured.source == "the recorded forward", fixed_outputs=fixed_outputs)
    fix_modules(propagation, captured.graph, fixed)
    handle_unseen(propagation, captured, strict)
    return couple_tied_tensors(model, propagation.table.specs())
