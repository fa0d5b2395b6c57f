"""Exports that stay HuggingFace models: widths tied across layers and roles, the new widths written into the config.

A pruned HF model reloads with ``from_pretrained`` only if its config says how wide every layer is, and an HF
config has one field for many layers (``hidden_size``, ``intermediate_size``, ``num_attention_heads``), sometimes
for several roles (T5's ``num_heads``: encoder, decoder and cross-attention heads). Three parts:

* **Uniform widths.** A unit's *role* is its name with the layer index replaced by ``*``
  (``model.layers.*.mlp.gate_proj_(0, 128)_128``): the same position in every layer. :func:`set_uniform_choices`
  gives one choice per role, :func:`tie_uniform_widths` makes every unit of a role keep the same count,
  :func:`is_uniform` / :func:`non_uniform_roles` check. Given the HF ``model``, both also tie the units that one
  config field governs across roles (:func:`tie_across_fields`; which field governs which width is found by
  building the model on meta with each integer field doubled, :mod:`pyprune.mutators.hf_fields`): Whisper's one
  ``d_model`` for its encoder, decoder and convolutions, T5's heads with its cross-attention's (which do not prune),
  CLIP's text heads with the text hidden size they divide. Only the counts are tied: each layer still keeps its own
  most important channels (the config knows sizes, not which channels).
* **The config.** :func:`hf_config_for` reads the exported modules' shapes into a copy of the config (hidden size
  from the input embedding, intermediate size from the first MLP up projection, heads and ``head_dim`` from the
  first attention module when they changed; a composite config's ``text_config`` / ``vision_config`` from the
  sub-model built from each), builds the model from that config on the meta device and checks that every tensor has
  the export's shape. Where that reading misses a field (Whisper's ``encoder_ffn_dim`` / ``decoder_ffn_dim``, T5's
  ``num_heads``), every field is read off the widths it alone governs (:func:`hf_fields.solve_fields`) and checked
  again. A width that differs between layers, or that no config of the family holds, is one ConfigError naming the
  role and both shapes.
* **Derived scales.** A float the model derives from a width in ``__init__`` (Gemma's ``sqrt(hidden_size)``
  embedding scale, T5's ``d_model ** -0.5`` before its tied ``lm_head``) is folded into the export's weights, so
  that its logits and the reload's stay the ones of the dynamic model (:mod:`pyprune.mutators.hf_scales`: the
  embedding table, and a tied table's logits undone at the final norm, whose output, the last hidden state, is
  scaled); any other such float is a ConfigError naming the module.

``ChannelMutator.export`` calls :func:`attach_hf_config` on every ``PreTrainedModel``: the export gets the new
config, or (widths not expressible) keeps working but its ``save_pretrained`` raises that error and points to
:func:`pyprune.mutators.io.save_pruned`.

transformers is imported only when the model comes from it (``import pyprune`` never imports it).
"""
import copy
import re
from fractions import Fraction
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.config_view import ConfigView
from . import hf_fields
from .hf_fields import build_on_meta, linear_dims
from .hf_scales import ScaleFolds, hf_embeddings, plan_scale_folds

__all__ = ["role_of", "uniform_roles", "non_uniform_roles", "is_uniform", "set_uniform_choices",
           "tie_uniform_widths", "tie_across_fields", "hf_config_for", "attach_hf_config", "HF_SAVE_REFUSED"]

# a path component that is only digits: the index into a ModuleList of layers (``layers.3.``, ``h.0.``)
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=[._])|^\d+(?=\.)")
# config keys of the MLP width, in the order the families use them (Llama / BERT, GPT-2, T5, BART-like, DistilBERT)
_INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "hidden_dim")
HF_SAVE_REFUSED = "pyprune_hf_save_refused"  # the reason a non-uniform export's save_pretrained gives


# ------------------------------------------------------------------------------------------------ uniform widths
def role_of(name: str) -> str:
    """``name`` (a unit, module or tensor name) with every layer index replaced by ``*``."""
    return _LAYER_INDEX.sub("*", name)


def uniform_roles(mutator) -> Dict[str, List[Any]]:
    """``{role: [mutable units of that role, in model order]}``; a role's units have the same width."""
    mutator._require_prepared()
    roles: Dict[str, List[Any]] = {}
    for unit in mutator.mutable_units:
        # the width is part of the key: two units at one position with different widths are not one role
        roles.setdefault(_role_key(unit), []).append(unit)
    return roles


def _role_key(unit) -> str:
    role = role_of(unit.name)
    return role if role.endswith(f"_{unit.num_channels}") else f"{role}[{unit.num_channels}]"


def non_uniform_roles(mutator, model: Optional[nn.Module] = None) -> Dict[str, List[int]]:
    """``{role: kept count of each of its units}`` for every role whose units keep different counts; with the HF
    ``model``, also ``{'role + role + ...': counts}`` for each group of units one config field governs
    (:func:`tie_across_fields`) whose counts no config holds."""
    found = {role: [u.active_channels for u in units] for role, units in uniform_roles(mutator).items()
             if len({u.active_channels for u in units}) > 1}
    if model is not None:
        for group, by_name in _unit_groups(mutator, model):
            scales = {name: by_name[name].active_channels / share for name, share in group.items()}
            if len(set(scales.values())) > 1:
                found[" + ".join(dict.fromkeys(role_of(name) for name in group))] = \
                    [by_name[name].active_channels for name in group]
    return found


def is_uniform(mutator, model: Optional[nn.Module] = None) -> bool:
    """Every unit of a role keeps the same number of channels (with the HF ``model``: and the units one config
    field governs keep counts that field can hold)."""
    return not non_uniform_roles(mutator, model)


def set_uniform_choices(mutator, choices: Mapping[str, Any], model: Optional[nn.Module] = None) -> None:
    """Set ``{role: choice}``: one choice drives every unit of the role (all validated first, nothing changed on
    a bad one). Roles are the keys of :func:`uniform_roles`. With the HF ``model`` the mutator was prepared on, the
    units of other roles that one config field governs with it follow too (:func:`tie_across_fields`): T5's encoder
    and decoder heads, Whisper's encoder / decoder residual stream; two given roles that disagree on one field are a
    ConfigError."""
    if not isinstance(choices, Mapping):
        raise ConfigError(f"set_uniform_choices takes a dict {{role: choice}}, got {type(choices).__name__}")
    roles = uniform_roles(mutator)
    unknown = [role for role in choices if role not in roles]
    if unknown:
        raise ConfigError(f"set_uniform_choices: unknown roles {unknown}; the model's roles are {sorted(roles)}")
    if model is None:
        mutator.set_choices({unit.name: choice for role, choice in choices.items() for unit in roles[role]})
        return
    # validated as set_choices validates (one ConfigError naming the unit, nothing changed), then tied as counts
    counts = {unit.name: mutator._count_for(unit, choice) for role, choice in choices.items() for unit in roles[role]}
    counts = tie_across_fields(mutator, model, counts, given=set(counts))
    by_name = {unit.name: unit for unit in mutator.mutable_units}
    mutator.set_choices({name: by_name[name].count_to_choice(count) for name, count in counts.items()})


def tie_uniform_widths(mutator, reduce: str = "max", model: Optional[nn.Module] = None) -> Dict[str, int]:
    """Make every unit of a role keep the same count: the role's largest (``reduce='max'``) or smallest
    (``'min'``) current count. With the HF ``model`` the mutator was prepared on, the units that one config field
    governs across roles are tied too (:func:`tie_across_fields`), so that the export's config can hold them.
    Returns ``{role: count}`` for every role."""
    if reduce not in ("max", "min"):
        raise ConfigError(f"tie_uniform_widths: reduce must be 'max' or 'min', got {reduce!r}")
    pick = max if reduce == "max" else min
    roles = uniform_roles(mutator)
    per_role = {role: pick(u.active_channels for u in units) for role, units in roles.items()}
    counts = {u.name: per_role[role] for role, units in roles.items() for u in units}
    if model is not None:
        counts = tie_across_fields(mutator, model, counts, pick=pick)
    by_name = {unit.name: unit for unit in mutator.mutable_units}
    mutator.set_choices({name: by_name[name].count_to_choice(count) for name, count in counts.items()
                         if by_name[name].active_channels != count})
    return {role: counts[units[0].name] for role, units in roles.items()}


def tie_across_fields(mutator, model: nn.Module, counts: Dict[str, int], pick=max,
                      given: Optional[set] = None) -> Dict[str, int]:
    """``counts`` (``{mutable unit name: count}``) made to agree wherever one config field governs several units.

    Each unit whose output spans a width one field of ``model.config`` governs alone (found by building the model on
    meta with the field doubled, :mod:`pyprune.mutators.hf_fields`) sets that field to ``kept * ratio``; units
    linked through shared fields form one group, whose counts follow one scale. A group with a unit that does not
    prune (T5's cross-attention heads) takes that unit's count; else the scale of the ``given`` units (all of them
    must agree, with the fixed units too) or ``pick`` over the group's counts. ConfigError naming one unit per role
    where those disagree, or a count would not be a whole number in range. Not an HF model: ``counts`` unchanged.
    The field map costs one meta build per integer config field (cached per config)."""
    result = dict(counts)
    for group, by_name in _unit_groups(mutator, model):  # {unit name: its count per unit of the group's scale}
        fixed = {name: by_name[name].active_channels / share for name, share in group.items()
                 if not by_name[name].is_mutable}
        asked = {name: result[name] / share for name, share in group.items()
                 if name in result and (given is None or name in given)}
        if not asked:
            continue
        # the tie follows the fixed units, which must agree; given counts must agree with them and each other
        must_agree = fixed if given is None else dict(fixed, **asked)
        if len(set(must_agree.values())) > 1:
            shown = ", ".join(f"{name} keeps {by_name[name].active_channels if name in fixed else result[name]}"
                              for name in _one_per_role(must_agree))
            raise ConfigError(f"tie_across_fields: one config field governs these units, which keep counts no "
                              f"config holds: {shown}")
        scale = next(iter(must_agree.values())) if must_agree else pick(asked.values())
        for name, share in group.items():
            count = scale * share
            unit = by_name[name]
            if not unit.is_mutable:
                continue
            if count.denominator != 1 or not 1 <= count <= unit.num_channels:
                raise ConfigError(f"tie_across_fields: {name} would keep {float(count):g} of its "
                                  f"{unit.num_channels} channels to match the units one config field ties it to")
            result[name] = int(count)
    return result


def _unit_groups(mutator, model: nn.Module) -> List[Tuple[Dict[str, Fraction], Dict[str, Any]]]:
    """``[(group, {unit name: unit})]``: the units (fixed ones too) linked through the config fields that govern
    them alone (:func:`_field_groups`); none for a model that is not an HF ``PreTrainedModel``."""
    pretrained = _pretrained_model_class()
    if pretrained is None or not isinstance(model, pretrained):
        return []
    governed = hf_fields.field_map(type(model), model.config)
    sole = hf_fields.sole_fields(governed)
    ratios = {u.name: hf_fields.unit_ratios(u, model.config, governed, sole) for u in mutator.units}
    by_name = {u.name: u for u in mutator.units}
    return [(group, by_name) for group in _field_groups(ratios)]


def _one_per_role(names) -> List[str]:
    """The first name of each role among ``names``, at most four: the units an error message shows."""
    shown: Dict[str, str] = {}
    for name in names:
        shown.setdefault(role_of(name), name)
    return list(shown.values())[:4]


def _field_groups(ratios: Dict[str, Dict[str, Fraction]]) -> List[Dict[str, Fraction]]:
    """Units linked through shared fields, each group ``{unit name: count at scale 1}`` (``field = count *
    ratio``, so two units of one field keep counts in the inverse ratio of their ratios)."""
    by_field: Dict[str, List[str]] = {}
    for name, fields in ratios.items():
        for path in fields:
            by_field.setdefault(path, []).append(name)
    seen: set = set()
    groups = []
    for start in ratios:
        if start in seen or not ratios[start]:
            continue
        group = {start: Fraction(1)}
        todo = [start]
        seen.add(start)
        while todo:
            name = todo.pop()
            for path, ratio in ratios[name].items():
                value = group[name] * ratio  # the field at scale 1
                for other in by_field[path]:
                    share = value / ratios[other][path]
                    if other not in group:
                        group[other] = share
                        seen.add(other)
                        todo.append(other)
        groups.append(group)
    return groups


# ---------------------------------------------------------------------------------------------------- HF config
def _pretrained_model_class():
    """transformers' PreTrainedModel if transformers is already imported (a model from it exists), else None."""
    if "transformers" not in sys.modules:
        return None
    from transformers import PreTrainedModel
    return PreTrainedModel


def _first_attribute(module: nn.Module, names) -> Optional[int]:
    """The first of ``names`` that is an int attribute of ``module``, or one the module's own config view holds
    (Phi-3's ``config.num_attention_heads``, see :class:`pyprune.ops.config_view.ConfigView`)."""
    view = getattr(module, "config", None)
    overrides = view.overrides if isinstance(view, ConfigView) else {}
    for name in names:
        value = getattr(module, name, overrides.get(name))
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _read_widths(exported: nn.Module, reference: nn.Module, config) -> Dict[str, int]:
    """``{config key: new value}`` for what the export changed, read off its modules named as in ``reference``
    (the model built from the original config)."""
    changed: Dict[str, int] = {}
    hidden_before = config.hidden_size
    hidden = _embedding_width(hf_embeddings(exported, "input"), hidden_before)
    if hidden != hidden_before:
        changed["hidden_size"] = int(hidden)
    key = next((k for k in _INTERMEDIATE_KEYS if hasattr(config, k)), None)
    if key is not None:
        # GPT-2 writes n_inner=None for "4 x hidden"; its MLP is then found by that width
        before = getattr(config, key) if getattr(config, key) is not None else 4 * hidden_before
        # the first MLP up projection, or fused gate | up one of twice the width (Phi-3's gate_up_proj)
        for name, module in reference.named_modules():
            dims = linear_dims(module)
            fused = {(hidden_before, before): 1, (hidden_before, 2 * before): 2}.get(dims)
            if fused is not None and "att" not in name.lower():
                after = linear_dims(exported.get_submodule(name))[1] // fused
                if after != getattr(config, key):
                    changed[key] = int(after)
                break
    changed.update(_read_heads(exported, reference, config))
    return changed


def _embedding_width(embedding: Optional[nn.Module], hidden_before: int) -> int:
    """The residual width the input embedding writes: a token table's columns, or for a vision patch embedding
    (ViT's ``ViTPatchEmbeddings``) the outputs of its first conv / linear layer; ``hidden_before`` when neither is
    found (nothing is claimed changed)."""
    if isinstance(embedding, nn.Embedding):
        return embedding.weight.shape[1]
    for module in (embedding.modules() if isinstance(embedding, nn.Module) else ()):
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.out_channels
        if isinstance(module, nn.Linear):
            return module.out_features
    return hidden_before


def _read_heads(exported: nn.Module, reference: nn.Module, config) -> Dict[str, int]:
    """Heads of the first attention module (one with a ``head_dim`` / ``attention_head_size``): its head count
    attributes when it has them, else its q / k projections' widths over ``head_dim``."""
    for name, ref in reference.named_modules():
        if _first_attribute(ref, ("head_dim", "attention_head_size")) is None:
            continue
        module = exported.get_submodule(name)
        head_dim = _first_attribute(module, ("head_dim", "attention_head_size"))
        heads = _first_attribute(module, ("num_heads", "num_attention_heads", "n_head", "n_heads"))
        kv_heads = _first_attribute(module, ("num_key_value_heads", "num_kv_heads"))
        for attribute, child_names in (("heads", ("q_proj", "query", "q")), ("kv", ("k_proj", "key", "k"))):
            if (heads if attribute == "heads" else kv_heads) is not None:
                continue
            child = next((getattr(module, c) for c in child_names if isinstance(getattr(module, c, None),
                                                                                 nn.Module)), None)
            dims = None if child is None else linear_dims(child)
            if dims is not None and head_dim and dims[1] % head_dim == 0:
                if attribute == "heads":
                    heads = dims[1] // head_dim
                else:
                    kv_heads = dims[1] // head_dim
        changed = {}
        for key, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                           ("head_dim", head_dim)):
            # head_dim only where the config stores it (Llama-like); BERT / GPT-2 derive it from hidden / heads
            if value is not None and hasattr(config, key) and getattr(config, key) != value:
                changed[key] = int(value)
        return changed
    return {}


def hf_config_for(exported: nn.Module, original_config) -> Any:
    """A copy of ``original_config`` with the widths of ``exported`` (a plain export of an HF ``PreTrainedModel``
    built from ``original_config``): ``hidden_size``, the MLP width (``intermediate_size`` / GPT-2's ``n_inner``
    / ``d_ff`` / ``ffn_dim``) and, when heads changed, ``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``. The model built from the new config must have every tensor of ``exported`` at its exact shape
    (checked on the meta device); otherwise ConfigError naming the role (the tensor name with ``*`` for the layer
    index) and both shapes. Where the first embedding / MLP / attention do not give every field, each field is read
    off the widths it alone governs (:func:`pyprune.mutators.hf_fields.solve_fields`: T5's ``num_heads`` / ``d_kv``,
    Whisper's ``encoder_*`` / ``decoder_*`` fields)."""
    return _config_and_folds(exported, original_config)[0]


def _config_and_folds(exported: nn.Module, original_config) -> Tuple[Any, ScaleFolds]:
    """:func:`hf_config_for`'s config, and the derived scales to fold into the export's weights
    (:mod:`pyprune.mutators.hf_scales`) so that a model built from it computes the same."""
    model_class = type(exported)
    reference = build_on_meta(model_class, copy.deepcopy(original_config))
    shapes = {name: tuple(t.shape) for name, t in exported.state_dict().items() if isinstance(t, torch.Tensor)}
    _check_uniform(shapes, model_class)
    config, changed = _read_config(exported, reference, original_config)
    rebuilt_model = build_on_meta(model_class, config)
    problems = _shape_problems(shapes, rebuilt_model)
    if problems:
        # the fields read off the first embedding / MLP / attention do not give every width (a field per role:
        # Whisper's encoder_ffn_dim / decoder_ffn_dim; T5's num_heads without a head_dim attribute): each field is
        # read off the widths it governs, found by building the model with it doubled
        governed = hf_fields.field_map(model_class, original_config)
        config = copy.deepcopy(original_config)
        changed = hf_fields.solve_fields(exported, original_config, governed)
        for path, value in changed.items():
            hf_fields.set_field(config, path, value)
        rebuilt_model = build_on_meta(model_class, config)
        problems = _shape_problems(shapes, rebuilt_model)
    if problems:
        written = ", ".join(f"{k}={v}" for k, v in changed.items()) or "no width changed"
        raise ConfigError(f"{model_class.__name__}: the pruned widths do not fit a {type(config).__name__} "
                          f"({written}): " + "; ".join(problems) + "; this family's config cannot express "
                          "these widths (e.g. a hidden size pruned while its attention heads are kept whole)")
    return config, plan_scale_folds(exported, rebuilt_model)


def _read_config(exported: nn.Module, reference: nn.Module, original_config) -> Tuple[Any, Dict[str, int]]:
    """A copy of ``original_config`` with the widths read off the export's first embedding / MLP / attention, and
    ``{field: value}`` of what changed."""
    config = copy.deepcopy(original_config)
    changed: Dict[str, int] = {}
    for key, owner in _width_owners(exported, original_config):
        # the model itself, or for a composite config (CLIP's text_config / vision_config) the sub-model built
        # from each sub-config: its widths go into that sub-config
        target = config if key is None else getattr(config, key)
        source = original_config if key is None else getattr(original_config, key)
        module = exported if owner == "" else exported.get_submodule(owner)
        for name, value in _read_widths(module, reference if owner == "" else reference.get_submodule(owner),
                                        source).items():
            setattr(target, name, value)
            changed[name if key is None else f"{key}.{name}"] = value
    return config, changed


def _shape_problems(shapes: Dict[str, Tuple[int, ...]], rebuilt_model: nn.Module) -> List[str]:
    """The first tensors of the export whose shape the rebuilt model does not have (role and both shapes)."""
    rebuilt = {name: tuple(t.shape) for name, t in rebuilt_model.state_dict().items()}
    wrong = [name for name in shapes if name in rebuilt and rebuilt[name] != shapes[name]]
    missing = sorted(set(shapes) ^ set(rebuilt))
    return [f"{role_of(n)} is {list(shapes[n])} in the export but {list(rebuilt[n])} from the config"
            for n in wrong[:3]] + ([f"tensors only one side has: {missing[:3]}"] if missing else [])


def _width_owners(exported: nn.Module, config) -> List[Tuple[Optional[str], str]]:
    """``[(sub-config key or None, module path)]``: where to read the widths of ``config`` from. A config with a
    ``hidden_size`` is read off the model (``[(None, '')]``); a composite one off the first ``PreTrainedModel`` in
    ``exported`` holding each sub-config that has a ``hidden_size``; ConfigError when neither is found."""
    if hasattr(config, "hidden_size"):
        return [(None, "")]
    pretrained = _pretrained_model_class()
    owners = []
    for key in sorted(getattr(config, "sub_configs", {}) or {}):
        sub = getattr(config, key, None)
        if sub is None or not hasattr(sub, "hidden_size"):
            continue
        path = next((name for name, module in exported.named_modules() if name and getattr(module, "config", None)
                     is sub and pretrained is not None and isinstance(module, pretrained)), None)
        if path is None:
            raise ConfigError(f"{type(exported).__name__}: no sub-model holds its {key} (a "
                              f"{type(sub).__name__}), so its widths cannot be read")
        owners.append((key, path))
    if not owners:
        raise ConfigError(f"{type(exported).__name__}: its {type(config).__name__} has no hidden_size and no "
                          "sub-config with one, so pyprune cannot write its widths")
    return owners


def _check_uniform(shapes: Dict[str, Tuple[int, ...]], model_class) -> None:
    """ConfigError naming the first role whose tensors have different shapes in different layers."""
    by_role: Dict[str, Dict[Tuple[int, ...], str]] = {}
    for name, shape in shapes.items():
        by_role.setdefault(role_of(name), {}).setdefault(shape, name)
    for role, seen in by_role.items():
        if len(seen) > 1:
            where = ", ".join(f"{list(shape)} at {name}" for shape, name in list(seen.items())[:3])
            raise ConfigError(f"{model_class.__name__}: widths are not uniform across layers: {role} is {where}; "
                              "one HF config holds one width per role")


class _RefusedSave:
    """Stands in for ``save_pretrained`` on an export whose widths no config of its family can hold."""

    def __init__(self, reason: str):
        self.reason = reason

    def __call__(self, *args, **kwargs):
        raise ConfigError(f"save_pretrained refused: {self.reason}. Save it with pyprune.mutators.save_pruned("
                          "directory, model, mutator) and rebuild it with load_pruned(fresh model, ...), or make "
                          "the widths uniform first (pyprune.mutators.hf_export.tie_uniform_widths(mutator) or "
                          "set_uniform_choices) and export again")


def attach_hf_config(exported: nn.Module) -> nn.Module:
    """If ``exported`` is an HF ``PreTrainedModel``: give it (and its submodules that share it) the config of its
    new widths, or, when :func:`hf_config_for` refuses, keep the old config and make ``save_pretrained`` raise
    that reason (the export still runs and trains). Any other module is returned untouched."""
    pretrained = _pretrained_model_class()
    if pretrained is None or not isinstance(exported, pretrained):
        return exported
    old = exported.config
    try:
        new, folds = _config_and_folds(exported, old)
    except ConfigError as error:
        exported.save_pretrained = _RefusedSave(str(error))
        setattr(exported, HF_SAVE_REFUSED, str(error))
        return exported
    # attention / MLP modules keep a reference to the one config (or to one of its sub-configs)
    swaps = {id(old): new}
    swaps.update({id(getattr(old, key)): getattr(new, key) for key in (getattr(old, "sub_configs", None) or {})
                  if getattr(old, key, None) is not None})
    for module in exported.modules():
        config = getattr(module, "config", None)
        if isinstance(config, ConfigView) and id(config._shared) in swaps:
            # a module's own view (its head count, Phi-3): the new config holds the same values where uniform
            shared = swaps[id(config._shared)]
            if all(getattr(shared, k, None) == v for k, v in config.overrides.items()):
                module.config = shared
            else:
                module.config = ConfigView(shared)
                module.config.__dict__.update(config.overrides)
            continue
        replacement = swaps.get(id(config))
        if replacement is not None:
            module.config = replacement
    folds.apply()  # the export takes the new config's derived scales, its weights undo them: same outputs
    return exported
