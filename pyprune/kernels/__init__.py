"""Channel gather / scatter kernels: the compiled extension when built, a pure-torch fallback otherwise.

This package is the only Python that touches ``pyprune._C``. (Placeholder: fallback only until the extension lands.)
"""
from ._torch_backend import gather_channels, scatter_channels, update_running_stats_

__all__ = ["gather_channels", "scatter_channels", "update_running_stats_"]
