"""The application built on the pyprune library: what ``pyprune prune`` / ``pyprune bench`` run.

* :mod:`pyprune.app.cli` - the command line (``pyprune prune``, ``pyprune bench``);
* :mod:`pyprune.app.training` - the pruning job: typed options, models, the training step, run directory, reports;
* :mod:`pyprune.app.data` - the built-in synthetic data set and image-folder loaders;
* :mod:`pyprune.app.bench` - kernel / model benchmarks and the model-zoo sweeps.

The dependency runs one way: this package imports the library (``mutators``, ``algorithms``, ``ops``, ...), and
nothing in the library imports this package. The old paths (``pyprune.training``, ``pyprune.cli``, ...) resolve
for one release, with a ``DeprecationWarning``.
"""
