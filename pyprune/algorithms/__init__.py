"""Algorithms: decide *when* and *how much* to prune while a model trains (mmrazor's PruneAlgorithm layer)."""
from .base import BaseAlgorithm, unwrap_model
from ..mutators.io import load_pruned, save_pruned  # where they live; kept importable from here
from .dcff import DCFF
from .dmcp import DMCP
from .group_fisher import GroupFisherAlgorithm
from .ite_prune import ItePruneAlgorithm, ItePruneConfigManager
from .slimmable import SlimmableNetwork

__all__ = ["BaseAlgorithm", "GroupFisherAlgorithm", "ItePruneAlgorithm", "ItePruneConfigManager", "unwrap_model",
           "save_pruned", "load_pruned"]
__all__ += ["DCFF"]
__all__ += ["DMCP"]
__all__ += ["SlimmableNetwork"]
