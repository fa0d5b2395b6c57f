"""Loading what a ``pyprune prune`` run wrote: the model is rebuilt by the name its structure file stores."""
import os

from torch import nn

from ...errors import ConfigError
from ...mutators.io import STRUCTURE_FILE, WEIGHTS_FILE, PathLike, load_pruned, read_structure
from .models import build_model

__all__ = ["load_pruned_run"]


def load_pruned_run(directory: PathLike, map_location="cpu") -> nn.Module:
    """The pruned model (eval mode) a ``pyprune prune`` run wrote to ``directory``, built from the model name and
    class count in its ``structure.json`` and loaded with its ``pruned_model.pt``."""
    structure = read_structure(os.path.join(directory, STRUCTURE_FILE))
    info = structure.get("model") or {}
    if "name" not in info or "num_classes" not in info:
        raise ConfigError(f"{directory}/{STRUCTURE_FILE} does not name the model it was made from")
    model = build_model(info["name"], int(info["num_classes"]))
    return load_pruned(model, structure, os.path.join(directory, WEIGHTS_FILE), map_location).eval()
