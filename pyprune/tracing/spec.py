"""What the tracer produces: coupled channel groups described by the module ranges they touch (mmrazor layout).

The types themselves live in :mod:`pyprune.channels` (the units and the mutator speak them too).
"""
import warnings

from ..channels import ChannelRef, UnitSpec

__all__ = ["ChannelRef", "UnitSpec", "PruningTraceWarning", "warn_untraceable"]


class PruningTraceWarning(UserWarning):
    """An op the tracer cannot map to channels; the channel groups it touches are fixed (not pruned)."""


def warn_untraceable(message: str) -> None:
    warnings.warn(message, PruningTraceWarning, stacklevel=3)
