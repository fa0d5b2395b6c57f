"""Benchmarks of pyprune's dynamic layers and models against an mmrazor-style baseline and the exported model.

``pyprune bench ops`` / ``pyprune bench models`` (see :func:`main`); ``--quick`` runs in seconds.
"""
from .command import main

__all__ = ["main"]
