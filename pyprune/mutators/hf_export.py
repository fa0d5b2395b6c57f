"""Exports that stay HuggingFace models: widths tied across layers, and the new widths written into the config.

A pruned HF model reloads with ``from_pretrained`` only if its config says how wide every layer is, and an HF
config has one ``hidden_size`` / ``intermediate_size`` / ``num_attention_heads`` for all layers. Two parts:

* **Uniform widths.** A unit's *role* is its name with the layer index replaced by ``*``
  (``model.layers.*.mlp.gate_proj_(0, 128)_128``): the same position in every layer. :func:`set_uniform_choices`
  gives one choice per role, :func:`tie_uniform_widths` makes every unit of a role keep the same count,
  :func:`is_uniform` / :func:`non_uniform_roles` check. Only the counts are tied: each layer still keeps its own
  most important channels (the config knows sizes, not which channels).
* **The config.** :func:`hf_config_for` reads the exported modules' shapes into a copy of the config (hidden size
  from the input embedding, intermediate size from the first MLP up projection, heads and ``head_dim`` from the
  first attention module when they changed), then builds the model from that config on the meta device and checks
  that every tensor has the export's shape: a width that differs between layers, or that this config family
  cannot express, is one ConfigError naming the role; so is a float attribute the new config would derive
  otherwise (Gemma's ``sqrt(hidden_size)`` embedding scale). A composite config (CLIP's ``text_config`` /
  ``vision_config``) gets each sub-config's widths from the sub-model built from it. ``ChannelMutator.export``
  calls :func:`attach_hf_config` on every ``PreTrainedModel``: the export gets the new config, or (widths not
  expressible) keeps working but its ``save_pretrained`` raises that error and points to
  :func:`pyprune.mutators.io.save_pruned`.

transformers is imported only when the model comes from it (``import pyprune`` never imports it).
"""
import copy
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.config_view import ConfigView

__all__ = ["role_of", "uniform_roles", "non_uniform_roles", "is_uniform", "set_uniform_choices",
           "tie_uniform_widths", "hf_config_for", "attach_hf_config", "HF_SAVE_REFUSED"]

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


def non_uniform_roles(mutator) -> Dict[str, List[int]]:
    """``{role: kept count of each of its units}`` for every role whose units keep different counts."""
    return {role: [u.active_channels for u in units] for role, units in uniform_roles(mutator).items()
            if len({u.active_channels for u in units}) > 1}


def is_uniform(mutator) -> bool:
    """Every unit of a role keeps the same number of channels."""
    return not non_uniform_roles(mutator)


def set_uniform_choices(mutator, choices: Mapping[str, Any]) -> None:
    """Set ``{role: choice}``: one choice drives every unit of the role (all validated first, nothing changed on
    a bad one). Roles are the keys of :func:`uniform_roles`."""
    if not isinstance(choices, Mapping):
        raise ConfigError(f"set_uniform_choices takes a dict {{role: choice}}, got {type(choices).__name__}")
    roles = uniform_roles(mutator)
    unknown = [role for role in choices if role not in roles]
    if unknown:
        raise ConfigError(f"set_uniform_choices: unknown roles {unknown}; the model's roles are {sorted(roles)}")
    mutator.set_choices({unit.name: choice for role, choice in choices.items() for unit in roles[role]})


def tie_uniform_widths(mutator, reduce: str = "max") -> Dict[str, int]:
    """Make every unit of a role keep the same count: the role's largest (``reduce='max'``) or smallest
    (``'min'``) current count. Returns ``{role: count}`` for every role."""
    if reduce not in ("max", "min"):
        raise ConfigError(f"tie_uniform_widths: reduce must be 'max' or 'min', got {reduce!r}")
    pick = max if reduce == "max" else min
    roles = uniform_roles(mutator)
    counts = {role: pick(u.active_channels for u in units) for role, units in roles.items()}
    mutator.set_choices({u.name: u.count_to_choice(counts[role]) for role, units in roles.items() for u in units
                         if u.active_channels != counts[role]})
    return counts


# ---------------------------------------------------------------------------------------------------- HF config
def _pretrained_model_class():
    """transformers' PreTrainedModel if transformers is already imported (a model from it exists), else None."""
    if "transformers" not in sys.modules:
        return None
    from transformers import PreTrainedModel
    return PreTrainedModel


def _build_on_meta(model_class, config) -> nn.Module:
    """``model_class(config)`` with its tensors on the meta device: shapes only, no memory, no initialisation."""
    from transformers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a tiny test vocabulary makes config checks warn on every build; shown once
    try:
        with torch.device("meta"):
            return model_class(config)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as error:
        # a model class that is not built from its config alone, or a config it rejects: no config is written
        raise ConfigError(f"{model_class.__name__} cannot be rebuilt from a {type(config).__name__} on the meta "
                          f"device ({type(error).__name__}: {error})") from None
    finally:
        logging.set_verbosity(verbosity)


def _linear_dims(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(in, out) of a Linear or GPT-2's transposed Conv1D (weight ``[in, out]``), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx") and hasattr(module, "nf"):
        return module.nx, module.nf
    return None


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
    hidden = _embedding_width(exported.get_input_embeddings(), hidden_before)
    if hidden != hidden_before:
        changed["hidden_size"] = int(hidden)
    key = next((k for k in _INTERMEDIATE_KEYS if hasattr(config, k)), None)
    if key is not None:
        # GPT-2 writes n_inner=None for "4 x hidden"; its MLP is then found by that width
        before = getattr(config, key) if getattr(config, key) is not None else 4 * hidden_before
        # the first MLP up projection, or fused gate | up one of twice the width (Phi-3's gate_up_proj)
        for name, module in reference.named_modules():
            dims = _linear_dims(module)
            fused = {(hidden_before, before): 1, (hidden_before, 2 * before): 2}.get(dims)
            if fused is not None and "att" not in name.lower():
                after = _linear_dims(exported.get_submodule(name))[1] // fused
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
            dims = None if child is None else _linear_dims(child)
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
    index) and both shapes."""
    model_class = type(exported)
    reference = _build_on_meta(model_class, copy.deepcopy(original_config))
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
    shapes = {name: tuple(t.shape) for name, t in exported.state_dict().items() if isinstance(t, torch.Tensor)}
    _check_uniform(shapes, model_class)
    rebuilt_model = _build_on_meta(model_class, config)
    rebuilt = {name: tuple(t.shape) for name, t in rebuilt_model.state_dict().items()}
    wrong = [name for name in shapes if name in rebuilt and rebuilt[name] != shapes[name]]
    missing = sorted(set(shapes) ^ set(rebuilt))
    if wrong or missing:
        written = ", ".join(f"{k}={v}" for k, v in changed.items()) or "no width changed"
        problems = [f"{role_of(n)} is {list(shapes[n])} in the export but {list(rebuilt[n])} from the config"
                    for n in wrong[:3]] + ([f"tensors only one side has: {missing[:3]}"] if missing else [])
        raise ConfigError(f"{model_class.__name__}: the pruned widths do not fit a {type(config).__name__} "
                          f"({written}): " + "; ".join(problems) + "; this family's config cannot express "
                          "these widths (e.g. a hidden size pruned while its attention heads are kept whole)")
    _check_derived_scales(exported, rebuilt_model, model_class)
    return config


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


def _check_derived_scales(exported: nn.Module, rebuilt: nn.Module, model_class) -> None:
    """ConfigError naming the first module whose float attribute the new config would set to another value.

    A model built from the new config recomputes what its modules derive from the widths (Gemma's embedding
    scale ``sqrt(hidden_size)``, an attention ``scaling`` from ``head_dim``); the export keeps the values it was
    trained with, so a reload would compute other logits. Plain float attributes are compared (they are set in
    ``__init__`` and so present on the meta-built model)."""
    for name, module in exported.named_modules():
        try:
            other = rebuilt.get_submodule(name)
        except AttributeError:
            continue
        for key, value in vars(module).items():
            if key.startswith("_") or not isinstance(value, float):
                continue
            new = vars(other).get(key)
            if isinstance(new, float) and abs(new - value) > 1e-6 * max(abs(value), 1.0):
                raise ConfigError(f"{model_class.__name__}: {role_of(name) or 'the model'}.{key} is {value:.6g} in "
                                  f"the export but {new:.6g} in a model built from the new config (derived from a "
                                  "pruned width): a reload would compute other outputs")


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
        new = hf_config_for(exported, old)
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
    return exported
