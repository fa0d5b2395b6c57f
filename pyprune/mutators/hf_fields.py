"""Which field of an HF config governs which width of the model built from it, found by building it on meta.

An HF config has one field for many layers, and sometimes for several roles: T5's ``num_heads`` sets the heads of the
encoder's and the decoder's self-attention and of the cross-attention, Whisper's ``d_model`` the residual stream of
the encoder, of the decoder and the output of the audio convolutions, while its ``encoder_ffn_dim`` /
``decoder_ffn_dim`` are two fields. Rather than a table per family, the model is built on the meta device once from
the config and once per integer field with that field doubled: a *width* whose value changes is governed by the
field. Widths (:func:`module_widths`) are keyed like the units' layer references: a module name for its output width
(a Linear's ``out_features``, an Embedding's ``embedding_dim``, a norm's weight length), ``module.attribute`` for an
integer attribute (``self_attn.num_heads``).

:func:`field_map` gives ``{field: {width key: (value, value with the field doubled)}}``; :func:`unit_ratios` how a
unit's kept channels set the fields that govern it alone; :func:`solve_fields` the field values that give an
export's widths. transformers is imported only by the callers that hold a model from it.
"""
import copy
from fractions import Fraction
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["build_on_meta", "linear_dims", "module_widths", "field_map", "solve_fields", "sole_fields", "unit_ratios",
           "get_field", "set_field"]

FieldMap = Dict[str, Dict[str, Tuple[int, int]]]
_FIELD_MAPS: Dict[Tuple[type, str], FieldMap] = {}  # (model class, config json): the map, built once per config
_FIELD_MAPS_KEPT = 8  # the most recent configs' maps


def build_on_meta(model_class, config) -> nn.Module:
    """``model_class(config)`` with its tensors on the meta device: shapes only, no memory, no initialisation."""
    from transformers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a tiny test vocabulary makes config checks warn on every build; shown once
    try:
        with torch.device("meta"):
            return model_class(config)
    except (TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError, AssertionError,
            ZeroDivisionError, IndexError, KeyError) as error:
        # a model class that is not built from its config alone, or a config it rejects: no config is written
        raise ConfigError(f"{model_class.__name__} cannot be rebuilt from a {type(config).__name__} on the meta "
                          f"device ({type(error).__name__}: {error})") from None
    finally:
        logging.set_verbosity(verbosity)


def linear_dims(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(in, out) of a Linear or GPT-2's transposed Conv1D (weight ``[in, out]``), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx") and hasattr(module, "nf"):
        return module.nx, module.nf
    return None


def _output_width(module: nn.Module) -> Optional[int]:
    """The width a layer writes: Linear / Conv out channels, GPT-2 Conv1D's ``nf``, an Embedding's columns, else the
    length of its own 1-d ``weight`` (a norm); None for a container."""
    dims = linear_dims(module)
    if dims is not None:
        return dims[1]
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    weight = module._parameters.get("weight")
    return int(weight.shape[0]) if weight is not None and weight.dim() == 1 else None


def module_widths(model: nn.Module) -> Dict[str, int]:
    """``{module name: output width}`` and ``{module.attribute: value}`` of every integer attribute (public, not
    bool) of every module of ``model``."""
    widths: Dict[str, int] = {}
    for name, module in model.named_modules():
        width = _output_width(module)
        if width is not None:
            widths[name] = width
        for key, value in vars(module).items():
            if not key.startswith("_") and isinstance(value, int) and not isinstance(value, bool):
                widths[f"{name}.{key}" if name else key] = value
    return widths


def _integer_fields(config, prefix: str = "") -> Iterator[str]:
    """Paths of the config's positive integer fields, a composite config's sub-configs' included
    (``text_config.hidden_size``)."""
    for key, value in vars(config).items():
        if key.startswith("_"):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            yield prefix + key
        elif key in (getattr(config, "sub_configs", None) or {}) and value is not None and hasattr(value, "to_dict"):
            yield from _integer_fields(value, f"{prefix}{key}.")


def get_field(config, path: str) -> Any:
    *owners, key = path.split(".")
    for owner in owners:
        config = getattr(config, owner)
    return getattr(config, key)


def set_field(config, path: str, value: Any) -> None:
    *owners, key = path.split(".")
    for owner in owners:
        config = getattr(config, owner)
    setattr(config, key, value)


def field_map(model_class, config) -> FieldMap:
    """``{field path: {width key: (value, value with the field doubled)}}`` for every integer field of ``config``
    whose doubling changes a width of ``model_class(config)`` and still builds (both on meta; cached per config).
    Width keys are those of :func:`module_widths`; only widths of modules present in both builds are compared.
    Cost: one meta build per integer field (5.1 s for Llama-3-8B's sizes on a 2-core CPU, 1-2 s for the zoo's tiny
    configs)."""
    cache_key = (model_class, config.to_json_string(use_diff=False))
    if cache_key in _FIELD_MAPS:
        return _FIELD_MAPS[cache_key]
    reference = module_widths(build_on_meta(model_class, copy.deepcopy(config)))
    governed: FieldMap = {}
    for path in _integer_fields(config):
        doubled = copy.deepcopy(config)
        set_field(doubled, path, 2 * get_field(config, path))
        try:
            widths = module_widths(build_on_meta(model_class, doubled))
        except ConfigError:  # a field the model checks against another (heads that no longer divide the width)
            continue
        changed = {key: (value, widths[key]) for key, value in reference.items()
                   if key in widths and widths[key] != value}
        if changed:
            governed[path] = changed
    if len(_FIELD_MAPS) >= _FIELD_MAPS_KEPT:
        del _FIELD_MAPS[next(iter(_FIELD_MAPS))]
    _FIELD_MAPS[cache_key] = governed
    return governed


def sole_fields(governed: FieldMap) -> Dict[str, str]:
    """``{width key: field path}`` for the widths one field alone governs, in proportion (doubling the field doubles
    the width): those a field's new value can be read from."""
    owners: Dict[str, List[str]] = {}
    for path, widths in governed.items():
        for key in widths:
            owners.setdefault(key, []).append(path)
    return {key: paths[0] for key, paths in owners.items()
            if len(paths) == 1 and governed[paths[0]][key][1] == 2 * governed[paths[0]][key][0]}


def unit_ratios(unit, config, governed: FieldMap, sole: Dict[str, str]) -> Dict[str, Fraction]:
    """``{field path: field value per kept channel of unit}``: for each output reference of the unit that spans a
    whole width one field governs alone (``sole``), the field is ``kept channels * ratio`` (a query projection of
    heads of 16 on a BERT / CLIP / Whisper stream: ``hidden = 16 * heads``; its ``num_heads``: ``heads = 1 *
    heads``)."""
    ratios: Dict[str, Fraction] = {}
    for ref in unit.output_related:
        path = sole.get(ref.name)
        if path is None:
            continue
        before = governed[path][ref.name][0]
        if before == unit.num_channels * ref.expand:  # the reference is the whole width, not a slice of it
            ratios.setdefault(path, Fraction(get_field(config, path) * ref.expand, before))
    return ratios


def solve_fields(exported: nn.Module, config, governed: FieldMap) -> Dict[str, int]:
    """``{field path: value}`` for the fields whose value in ``exported`` differs from ``config``'s.

    First each field is read off the widths it governs alone (:func:`sole_fields`), scaled as the doubling scaled
    them (``width / value * field``): module output widths first, integer attributes only for a field that governs
    no output width alone (Whisper's heads: ``num_heads`` on its attention modules). Then a field still unread is
    solved from a width it shares with fields already read, each of which doubles or halves it (Phi-3's
    ``head_dim = hidden_size / num_attention_heads``: the heads from the head width and the hidden size). The most
    common reading wins; a width that does not scale to an integer is not read."""
    widths = module_widths(exported)
    module_names = {name for name, _ in exported.named_modules()}
    readings: Dict[str, Dict[bool, List[int]]] = {}
    for key, path in sole_fields(governed).items():
        value, before = get_field(config, path), governed[path][key][0]
        if key in widths and (widths[key] * value) % before == 0:
            is_attribute = key not in module_names
            readings.setdefault(path, {False: [], True: []})[is_attribute].append(widths[key] * value // before)
    known = {path: _most_common(found[False] or found[True]) for path, found in readings.items()}
    known.update(_solve_shared(widths, config, governed, known))
    return {path: value for path, value in known.items() if value != get_field(config, path)}


def _most_common(values: List[int]) -> int:
    return max(set(values), key=values.count)


def _solve_shared(widths: Dict[str, int], config, governed: FieldMap, known: Dict[str, int]) -> Dict[str, int]:
    """Fields not in ``known`` solved from widths they share with known ones: a width each of its fields doubles
    (exponent 1) or halves (-1) is ``before * prod((new / old) ** exponent)``; a width with one unknown field gives
    it, repeated while that finds more."""
    exponents: Dict[str, Dict[str, int]] = {}  # width key: {field: +1 / -1}
    for path, changed in governed.items():
        for key, (before, doubled) in changed.items():
            if doubled in (2 * before, before / 2):
                exponents.setdefault(key, {})[path] = 1 if doubled == 2 * before else -1
            else:
                exponents.setdefault(key, {})[path] = 0  # not a power law: the width is not read
    found: Dict[str, int] = {}
    progress = True
    while progress:
        progress = False
        readings: Dict[str, List[int]] = {}
        for key, fields in exponents.items():
            unknown = [path for path in fields if path not in known and path not in found]
            if len(unknown) != 1 or key not in widths or 0 in fields.values():
                continue
            path = unknown[0]
            ratio = Fraction(widths[key], governed[path][key][0])
            for other, exponent in fields.items():
                if other != path:
                    value = {**known, **found}[other]
                    ratio /= Fraction(value, get_field(config, other)) ** exponent
            solved = get_field(config, path) * ratio ** fields[path]
            if solved.denominator == 1 and solved > 0:
                readings.setdefault(path, []).append(int(solved))
        for path, values in readings.items():
            found[path] = _most_common(values)
            progress = True
    return found
