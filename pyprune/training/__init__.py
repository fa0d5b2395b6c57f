"""Training helpers for the main job (``pyprune prune``): models, loop pieces, distributed setup, reports."""
from .pruned_run import load_pruned_run

__all__ = ["load_pruned_run"]
