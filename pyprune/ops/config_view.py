"""A module's own view of a config object that other modules share.

HF attention modules keep a reference to the model's one config and some read their widths from it in ``forward``
(Phi-3: ``query_pos = self.config.num_attention_heads * self.head_dim``). Once layers keep different numbers of
heads, each needs its own value there: :class:`ConfigView` holds the values set on it and reads everything else
from the shared config, so a change made to the shared config later (``_attn_implementation``) is still seen.
"""
from typing import Any

__all__ = ["ConfigView", "own_config"]


class ConfigView:
    """Attributes set on the view stay on it; every other attribute is read from ``shared``."""

    def __init__(self, shared: Any):
        self.__dict__["_shared"] = shared

    def __getattr__(self, name: str) -> Any:
        if name == "_shared":  # during unpickling / deepcopy, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self._shared, name)

    @property
    def overrides(self) -> dict:
        """``{attribute: value}`` set on this view."""
        return {k: v for k, v in self.__dict__.items() if k != "_shared"}

    def __repr__(self) -> str:
        return f"ConfigView({type(self._shared).__name__}, {self.overrides})"


def own_config(module: Any, attribute: str = "config") -> ConfigView:
    """``module.<attribute>`` as a :class:`ConfigView` of its own (installed the first time; later calls return
    the same view)."""
    current = module.__dict__[attribute]
    if not isinstance(current, ConfigView):
        current = ConfigView(current)
        module.__dict__[attribute] = current
    return current
