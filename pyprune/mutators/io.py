"""Saving a pruned model as (plain weights, structure JSON) and loading it back into a freshly built model.

The structure is the mutator's config in mmrazor's layout with every unit's channels and choice, so it rebuilds the
units of a fresh, unpruned model without tracing (``parse_cfg=dict(type='Config')``). Exporting that model at those
choices gives a plain model of the pruned shapes, into which the saved weights load with
``torch.load(weights_only=True)``.
"""
import json
import os
from collections.abc import Mapping
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError
from ..utils.files import atomic_torch_save, atomic_write_text
from .channel_mutator import ChannelMutator, export_static
from .hf_export import attach_hf_config

STRUCTURE_FORMAT = "pyprune-pruned-structure/1"
WEIGHTS_FILE, STRUCTURE_FILE = "pruned_model.pt", "structure.json"
PathLike = Union[str, os.PathLike]


def structure_dict(mutator, model_info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``{'format', 'model': model_info, 'mutator': config with unit init args, channels and choices}``."""
    return {"format": STRUCTURE_FORMAT, "model": dict(model_info or {}),
            "mutator": mutator.config_template(only_mutable_units=False, with_unit_init_args=True,
                                               with_channels=True)}


def save_pruned(directory: PathLike, model: nn.Module, mutator, model_info: Optional[Dict[str, Any]] = None,
                exported: Optional[nn.Module] = None) -> Dict[str, str]:
    """Write ``pruned_model.pt`` (state_dict of the exported plain model) and ``structure.json`` into ``directory``.

    ``model`` is the (dynamic) model the mutator prepared; ``exported`` its export if already made. ``model_info``
    (e.g. ``{'name': 'resnet18', 'num_classes': 10}``) is stored so the model can be rebuilt by name (``pyprune.app.training.load_pruned_run``).
    ``directory`` is created if it does not exist (as ``save_pretrained`` does); a path that is a file is refused.
    Returns ``{'weights': path, 'structure': path}``.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"save_pruned: {str(directory)!r} is a file, not a directory")
    exported = mutator.export(model) if exported is None else exported
    os.makedirs(directory, exist_ok=True)
    paths = {"weights": os.path.join(directory, WEIGHTS_FILE), "structure": os.path.join(directory, STRUCTURE_FILE)}
    state = {k: v.detach().cpu().clone() for k, v in exported.state_dict().items()}
    # atomic (temp file + rename): an interrupted save never leaves a half-written file under the final name
    atomic_torch_save(state, paths["weights"])
    atomic_write_text(paths["structure"], json.dumps(structure_dict(mutator, model_info), indent=1))
    return paths


def read_structure(structure: Union[PathLike, Mapping]) -> Dict[str, Any]:
    if isinstance(structure, Mapping):
        return dict(structure)
    try:
        with open(structure) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the pruned structure {str(structure)!r}: {error}") from None


def load_pruned(model: nn.Module, structure: Union[PathLike, Mapping],
                weights: Union[PathLike, Mapping, None] = None, map_location="cpu") -> nn.Module:
    """Rebuild a pruned model from a freshly built, unpruned ``model`` (consumed: its layers are replaced).

    ``structure``: the dict or path :func:`save_pruned` wrote (a bare mutator config works too). ``weights``: a
    state_dict or the path of one (loaded with ``weights_only=True``); ``None`` leaves the fresh initialization.
    Returns a plain ``nn.Module`` of the pruned shapes (no DynamicOps). Shapes that do not match -> ConfigError.
    An HF model comes back as :meth:`ChannelMutator.export` gives it (config of its widths, or a refused
    ``save_pretrained`` when they differ between layers): this is the format for widths no HF config holds.
    """
    structure = read_structure(structure)
    config = dict(structure.get("mutator", structure))
    config["parse_cfg"] = {"type": "Config"}
    mutator = ChannelMutator.from_config(config)
    mutator.prepare_from_supernet(model)
    pruned = attach_hf_config(export_static(model))  # an HF model gets the config of its widths, as in export
    if weights is not None:
        state = weights if isinstance(weights, Mapping) else torch.load(weights, map_location=map_location,
                                                                          weights_only=True)
        try:
            pruned.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).strip().splitlines()
            raise ConfigError("the pruned weights do not fit the structure: "
                              + " ".join(line.strip() for line in first[:3])) from None
    return pruned
