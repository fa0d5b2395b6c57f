"""Exceptions raised by pyprune. All are ``ValueError`` subclasses so callers can catch bad input uniformly."""


class PyPruneError(ValueError):
    """Base class of every error pyprune raises for bad input."""


class ChannelSelectionError(PyPruneError):
    """A channel choice (ratio, count, mask or index) is invalid for the layer or unit it was given to."""


class UntraceableOpError(PyPruneError):
    """The tracer met an operation it cannot map to channels (raised in strict mode)."""


class ConfigError(PyPruneError):
    """A mutator / unit config is malformed or does not match the model."""
