"""Training helpers for the main job (``pyprune prune``): models, loop pieces, distributed setup, reports."""
