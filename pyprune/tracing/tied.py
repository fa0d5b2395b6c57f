"""Tensors shared by several layers (tied input / output embeddings): every layer prunes them with one selection.

GPT-2, T5, BERT's masked-LM head and small Llama / Qwen models tie the output layer to the input embedding
(``lm_head.weight is embed.weight``): the embedding's output channels are the table's columns, and so are the
``lm_head``'s input channels. Pruning the tensor once, with the tie kept, needs every dim of a shared tensor to be
pruned by one channel group across all the layers holding it. After propagation, for each parameter that several
layers hold and each of its dims a layer side prunes (read from the layer kind's own slice layout):

* each layer covers the dim with the same units in the same ranges: nothing to do (GPT-2: one residual group);
* each covers it with one whole unit, the units different (BERT: the decoder reads the head transform's group):
  the units merge into one (they must keep the same channels);
* anything else (a layer reads the dim whole, partial ranges, different sizes): the units are fixed, so the tie holds.

A holder the forward never runs that is a twin of one it runs - a layer of the same kind holding the very same
tensors (T5's ``shared``, the embedding ``get_input_embeddings`` returns, beside ``encoder.embed_tokens``) - reads
nothing the trace could see: it follows its twin's units, so both keep the same channels and the tie holds.
"""
import dataclasses
import math
from typing import Dict, List, Optional, Tuple

from torch import nn

from .. import ops
from ..errors import ChannelSelectionError, ConfigError
from .spec import ChannelRef, UnitSpec

__all__ = ["couple_tied_tensors"]

Coverage = Tuple[Tuple[int, int, int, int], ...]  # (spec index, start, end, expand) per covering ref, sorted


def couple_tied_tensors(model: nn.Module, specs: List[UnitSpec]) -> List[UnitSpec]:
    """``specs`` with the units of each shared tensor's dims merged or fixed (see the module docstring)."""
    holders = _shared_parameters(model)
    if not holders:
        return specs
    parent = list(range(len(specs)))
    fixes: Dict[int, List[str]] = {}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    twins = _idle_twins(specs, holders)
    for path, users in holders.items():
        users = [user for user in users if user[0] not in twins]
        per_dim: Dict[int, List[Tuple[str, Coverage]]] = {}
        for name, module, attribute in users:
            for dim, is_output in _pruned_dims(module, attribute).items():
                per_dim.setdefault(dim, []).append((name, _coverage(specs, name, is_output, module)))
        for dim, covered in per_dim.items():
            readers = {name for name, _, _ in users}
            if len(covered) < len(readers):  # a holder that prunes no side on this dim reads it whole
                covered.append(("", ()))
            layouts = {coverage for _, coverage in covered}
            if len(layouts) == 1:
                continue
            whole = [c[0] for _, c in covered if len(c) == 1 and c[0][1] == 0 and c[0][3] == 1
                     and c[0][2] == specs[c[0][0]].num_channels]
            sizes = {specs[w[0]].num_channels for w in whole}
            touched = [entry[0] for _, coverage in covered for entry in coverage]
            if len(whole) == len(covered) and len(sizes) == 1:
                for w in whole[1:]:
                    parent[find(w[0])] = find(whole[0][0])
            else:
                names = sorted(readers)
                for index in touched:
                    if specs[index].fixed:
                        continue  # fixed already (e.g. the lm_head's vocabulary: the model output)
                    fixes.setdefault(index, []).append(
                        f"tensor {path} is shared by {names}, which cannot prune its dim {dim} with one selection")
    return _with_twins(_merged(specs, [find(i) for i in range(len(specs))], fixes), twins)


def _idle_twins(specs: List[UnitSpec], holders) -> Dict[str, str]:
    """``{holder no unit refers to (the forward never ran it): a holder units refer to, of the same type, holding
    exactly the same parameters}``."""
    referenced = {ref.name for spec in specs for ref in spec.output_related + spec.input_related}
    twins: Dict[str, str] = {}
    for users in holders.values():
        for name, module, _ in users:
            if name in referenced or name in twins:
                continue
            own = [id(p) for p in module.parameters()]
            twin = next((other for other, candidate, _ in users if other in referenced
                         and type(candidate) is type(module) and [id(p) for p in candidate.parameters()] == own), None)
            if twin is not None:
                twins[name] = twin
    return twins


def _with_twins(specs: List[UnitSpec], twins: Dict[str, str]) -> List[UnitSpec]:
    """``specs`` with every ref of a twin repeated for the idle holder that follows it."""
    if not twins:
        return specs
    def follow(refs):
        return refs + [dataclasses.replace(r, name=idle) for idle, twin in twins.items() for r in refs
                       if r.name == twin]
    return [dataclasses.replace(spec, output_related=follow(spec.output_related),
                                input_related=follow(spec.input_related)) for spec in specs]


def _shared_parameters(model: nn.Module) -> Dict[str, List[Tuple[str, nn.Module, str]]]:
    """``{path of a parameter held by more than one prunable layer: [(layer path, layer, attribute)]}``."""
    users: Dict[int, List[Tuple[str, nn.Module, str]]] = {}
    paths: Dict[int, str] = {}
    for name, module in model.named_modules():
        if not ops.is_prunable_layer(module):
            continue
        for attribute, tensor in module._parameters.items():
            if tensor is not None:
                users.setdefault(id(tensor), []).append((name, module, attribute))
                paths.setdefault(id(tensor), f"{name}.{attribute}" if name else attribute)
    return {paths[key]: found for key, found in users.items() if len({n for n, _, _ in found}) > 1}


def _pruned_dims(module: nn.Module, attribute: str) -> Dict[int, bool]:
    """``{dim of module.<attribute>: is_output}`` for each side of the layer whose selection slices that dim,
    read from the layer kind's ``_compact_layout`` at a half selection of one side at a time (on a DynamicOp
    sharing the module's tensors; the module itself is not touched)."""
    dims: Dict[int, bool] = {}
    for is_output in (True, False):
        op = _scratch_op(module)
        if op is None:
            return dims
        try:
            (op.set_out_channels if is_output else op.set_in_channels)(0.5)
        except (ChannelSelectionError, ConfigError):  # the side takes no selection (an embedding's ids)
            continue
        for piece in op._compact_layout():
            if piece.name != attribute:
                continue
            if piece.rows is not None:
                dims.setdefault(piece.dim, is_output)
            if piece.cols is not None:
                dims.setdefault(1, is_output)
    return dims


def _scratch_op(module: nn.Module) -> Optional[ops.DynamicChannelMixin]:
    """A DynamicOp of ``module``'s kind sharing its tensors, whose selection may be changed freely."""
    if isinstance(module, ops.DynamicChannelMixin):
        return ops.DynamicChannelMixin.convert_from.__func__(type(module), module)
    return ops.to_dynamic(module)


def _coverage(specs: List[UnitSpec], name: str, is_output: bool, module: nn.Module) -> Coverage:
    """Which units cover that side of layer ``name`` (for a layer with one selection: either side)."""
    kind = ops.layer_kind(module)
    either = kind is not None and kind.shares_selection(module)
    found = []
    for index, spec in enumerate(specs):
        for ref in spec.output_related + spec.input_related:
            if ref.name == name and ref.param_dim is None and (either or ref.is_output_channel == is_output):
                found.append((index, ref.start, ref.end, ref.expand))
    return tuple(sorted(set(found), key=lambda entry: (entry[1], entry[0])))


def _merged(specs: List[UnitSpec], roots: List[int], fixes: Dict[int, List[str]]) -> List[UnitSpec]:
    """One spec per root (members' refs in order, groups' lcm, fixed if any member is), at the first member's
    place."""
    members: Dict[int, List[int]] = {}
    for index, root in enumerate(roots):
        members.setdefault(root, []).append(index)
    out = []
    for index, spec in enumerate(specs):
        group = members[roots[index]]
        if group[0] != index:
            continue
        parts = [specs[i] for i in group]
        outputs = _unique([r for p in parts for r in p.output_related])
        inputs = _unique([r for p in parts for r in p.input_related])
        reasons = [p.reason for p in parts if p.reason] + [r for i in group for r in fixes.get(i, [])]
        out.append(UnitSpec(num_channels=spec.num_channels, output_related=outputs, input_related=inputs,
                            groups=math.lcm(*(p.groups for p in parts)),
                            fixed=any(p.fixed for p in parts) or any(i in fixes for i in group),
                            reason="; ".join(dict.fromkeys(reasons))))
    return out


def _unique(refs: List[ChannelRef]) -> List[ChannelRef]:
    """``refs`` without repeats, in order."""
    seen, out = set(), []
    for ref in refs:
        key = dataclasses.astuple(ref)
        if key not in seen:
            seen.add(key)
            out.append(ref)
    return out
