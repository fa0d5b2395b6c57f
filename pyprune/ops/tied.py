"""Parameters several layers hold (tied input / output embeddings) stay one Parameter in the export.

Each DynamicOp exports its own compact copies, so a table that ``embed`` and ``lm_head`` share would come out as two
tensors. :func:`retie_exported` makes the exported layers hold one Parameter again wherever every holder keeps the
same channels of it (same slice of the same tensor, from each op's ``_compact_layout``); the tracer makes tied
tensors one selection (``pyprune.tracing.tied``), so for a traced model they always do.
"""
import warnings
from typing import Dict, List, Optional, Tuple

from torch import nn

from .base import DynamicChannelMixin
from .compact_state import ChannelSlice, same_slice

__all__ = ["retie_exported"]

Holder = Tuple[str, str, Optional[ChannelSlice]]  # (module path, attribute, the slice it keeps or None = whole)


def retie_exported(model: nn.Module, exported: Dict[str, nn.Module]) -> None:
    """In place, in ``exported`` (``{path of a DynamicOp of model: its export}``, not yet swapped in): a parameter
    that several layers of ``model`` hold becomes one Parameter again in the layers that keep the same channels of
    it (a plain layer holding it keeps it whole, and its Parameter is the one kept). Holders that keep different
    channels get separate copies, with a warning naming them."""
    holders: Dict[int, List[Holder]] = {}
    for name, module in model.named_modules():
        slices = {}
        if isinstance(module, DynamicChannelMixin) and name in exported:
            slices = {piece.name: piece for piece in module._compact_layout()}
        elif isinstance(module, DynamicChannelMixin):
            continue  # inside another op (attention's out_proj): exported with it
        for attribute, tensor in module._parameters.items():
            if tensor is not None:
                holders.setdefault(id(tensor), []).append((name, attribute, slices.get(attribute)))
    for found in holders.values():
        if len({name for name, _, _ in found}) < 2:
            continue
        kept: List[List[Holder]] = []
        for holder in found:
            same = next((group for group in kept if same_slice(group[0][2], holder[2])), None)
            if same is None:
                kept.append([holder])
            else:
                same.append(holder)
        for group in kept:
            _tie(model, exported, group)
        if len(kept) > 1:
            described = [[f"{name}.{attribute}" for name, attribute, _ in group] for group in kept]
            warnings.warn(f"export: the parameter held by {described} is pruned differently by these layer groups; "
                          f"each group gets its own copy (the tie is not kept)", stacklevel=3)


def _tie(model: nn.Module, exported: Dict[str, nn.Module], group: List[Holder]) -> None:
    """Make every holder in ``group`` hold one Parameter: a plain layer's (it stays in the model), else the first
    export's."""
    def owner(name: str) -> nn.Module:
        return exported[name] if name in exported else model.get_submodule(name)

    plain = [h for h in group if h[0] not in exported]
    name, attribute, _ = (plain or group)[0]
    target = owner(name)._parameters[attribute]
    for other, other_attribute, _ in group:
        module = owner(other)
        if module._parameters[other_attribute] is not target:
            module._parameters[other_attribute] = target
