"""Which model outputs keep their channel count: the ``fixed_outputs`` policy of the tracer.

A model output's channels are fixed by default: whoever reads the output expects its shape. Hugging Face models
return more than their task output in their ``ModelOutput``: the encoder's last hidden state of an encoder-decoder,
each tower's output of CLIP, every layer's hidden states. Fixing those would fix the residual width they carry, so
for a ``ModelOutput`` (a ``transformers.utils.ModelOutput``) the default keeps the task outputs and frees the
auxiliary fields below. A freed output changes its channel count with the pruned model, by design; the export
equals the dynamic model on the fixed outputs.

Default, for the top-level fields of a ``ModelOutput``:

====================================================================================  =======
field                                                                                 default
====================================================================================  =======
``encoder_last_hidden_state`` (T5, Whisper, BART ``*ForConditionalGeneration``)       freed
``text_model_output``, ``vision_model_output`` (CLIP: each tower's output)            freed
``text_embeds``, ``image_embeds`` (CLIP: read by the similarity product only)         freed
``hidden_states``, ``encoder_hidden_states``, ``decoder_hidden_states``               freed
``attentions``, ``encoder_attentions``, ``decoder_attentions``, ``cross_attentions``  freed
``past_key_values`` (the cache the same pruned model reads back)                      freed
``loss``, ``logits``, ``logits_per_image``, ``logits_per_text``                       fixed
a base model's ``last_hidden_state`` and ``pooler_output``                            fixed
every other field                                                                     fixed
====================================================================================  =======

Any other output (a tensor, a tuple, a NamedTuple, a plain dict) is fixed whole by default.

``fixed_outputs`` overrides the default: ``"all"`` fixes every output; a list names the outputs that keep their
shape, everything else is freed. A name is a field of a dict / ``ModelOutput`` / NamedTuple output (``"logits"``),
a dotted path into nested ones (``"vision_model_output.pooler_output"``), or an int position in a tuple / list
output (``0`` for the ``logits`` of ``return logits, hidden``). A name that is no output field raises
:class:`~pyprune.errors.ConfigError` listing the fields the output has.
"""
from collections.abc import Mapping
from typing import Any, List, Optional, Sequence, Union

from ..errors import ConfigError

__all__ = ["AUXILIARY_FIELDS", "check_fixed_outputs", "fixed_parts", "fixed_output_values", "is_model_output_type"]

#: Top-level ``ModelOutput`` fields the default policy frees (see the module docstring).
AUXILIARY_FIELDS = frozenset({
    "encoder_last_hidden_state", "text_model_output", "vision_model_output", "text_embeds", "image_embeds",
    "hidden_states", "encoder_hidden_states", "decoder_hidden_states", "attentions", "encoder_attentions",
    "decoder_attentions", "cross_attentions", "past_key_values"})

FixedOutputs = Optional[Union[str, Sequence[Union[str, int]]]]


def check_fixed_outputs(fixed_outputs: FixedOutputs) -> FixedOutputs:
    """``fixed_outputs`` as the tracer takes it (None, ``"all"`` or a list of field names / int positions); a
    :class:`ConfigError` naming the key for anything else. Returns it with a list for any sequence."""
    if fixed_outputs is None or fixed_outputs == "all":
        return fixed_outputs
    if isinstance(fixed_outputs, (str, bytes)) or not isinstance(fixed_outputs, Sequence) or not all(
            isinstance(n, (str, int)) and not isinstance(n, bool) for n in fixed_outputs):
        raise ConfigError(f"fixed_outputs must be None (the default rule), 'all' or a list of output field names "
                          f"(str) / tuple positions (int), got a {type(fixed_outputs).__name__}")
    return list(fixed_outputs)


def is_model_output_type(kind: type) -> bool:
    """Whether ``kind`` is a transformers ``ModelOutput`` class (without importing transformers)."""
    return any(cls.__name__ == "ModelOutput" and cls.__module__.startswith("transformers.") for cls in kind.__mro__)


def _children(value):
    """(name, child) of a container output, None for a leaf (a tensor, a node, a cache object)."""
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return list(zip(value._fields, value))
    if isinstance(value, (tuple, list)):
        return list(enumerate(value))
    return None


def _named(value) -> bool:
    return isinstance(value, Mapping) or (isinstance(value, tuple) and hasattr(value, "_fields"))


def _field_names(output) -> List[Union[str, int]]:
    """What ``fixed_outputs`` may name in ``output``: its top-level fields (positions of a tuple) and the dotted
    paths of fields nested in dicts / NamedTuples."""
    names: List[Union[str, int]] = []

    def walk(value, prefix: Optional[str]):
        for name, child in _children(value) or []:
            path = name if prefix is None else f"{prefix}.{name}"
            names.append(path)
            if _named(child):
                walk(child, str(path))
    walk(output, None)
    return names


def _lookup(output, name: Union[str, int]):
    """The part of ``output`` at ``name`` (a field, a dotted path, a position); KeyError where there is none."""
    value = output
    for part in ([name] if isinstance(name, int) else name.split(".")):
        children = _children(value)
        if children is None:
            raise KeyError(name)
        if isinstance(part, str) and part.isdigit() and not _named(value):
            part = int(part)
        found = dict(children)
        if part not in found:
            raise KeyError(name)
        value = found[part]
    return value


def fixed_parts(output, fixed_outputs: FixedOutputs = None, model_output: bool = False) -> List[Any]:
    """The parts of ``output`` (a model's return value, or the tree of fx nodes that stands for it) whose channels
    stay fixed under ``fixed_outputs``; ``model_output``: ``output`` is (or stands for) a ``ModelOutput``, whose
    default frees :data:`AUXILIARY_FIELDS`. Raises ConfigError for a name that is no field of ``output``."""
    fixed_outputs = check_fixed_outputs(fixed_outputs)
    if fixed_outputs == "all" or (fixed_outputs is None and not (model_output and isinstance(output, Mapping))):
        return [output]
    if fixed_outputs is None:
        return [v for k, v in output.items() if k not in AUXILIARY_FIELDS]
    parts, missing = [], []
    for name in fixed_outputs:
        try:
            parts.append(_lookup(output, name))
        except KeyError:
            missing.append(name)
    if missing:
        raise ConfigError(f"fixed_outputs: {missing} {'is' if len(missing) == 1 else 'are'} no output field of the "
                          f"model; its output fields: {_field_names(output) or 'none (it returns one value)'}")
    return parts


def fixed_output_values(output, fixed_outputs: FixedOutputs = None) -> List[Any]:
    """The fixed parts of a model's real ``output`` (e.g. to compare an export with the dynamic model on what keeps
    its shape): :func:`fixed_parts`, with ``ModelOutput`` detected from the value."""
    return fixed_parts(output, fixed_outputs, model_output=is_model_output_type(type(output)))
