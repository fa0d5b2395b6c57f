"""Other libraries' spellings of pyprune's API, for code written against them.

* :mod:`pyprune.compat.mmrazor`: mmrazor's (and mmengine's) channel-pruning names - its mutator, algorithms, unit
  kinds, mutable channels and values, analyzer, dynamic ops and registries - importable from one module.

Importing this package imports nothing else (no torch); the submodule loads what it serves.
"""
