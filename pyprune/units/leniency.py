"""Config entries mmrazor accepts silently (a unit the model lacks, more channels than exist): warned, or refused.

mmrazor skips a target or choice for a unit the model does not have, and a count above the unit's width keeps every
channel. pyprune does the same by default but never silently: the entries it ignored or clamped are named in *one*
:class:`ConfigLeniencyWarning` per config read; ``strict=True`` raises :class:`~pyprune.errors.ConfigError` instead,
before anything changed.
"""
import warnings
from typing import Dict, List, Sequence

from ..errors import ConfigError

__all__ = ["ConfigLeniencyWarning", "LenientReport"]


class ConfigLeniencyWarning(UserWarning):
    """Config entries were ignored or clamped, as mmrazor does without saying so."""


class LenientReport:
    """Collects what one config read ignored or clamped; :meth:`finish` warns once (or raises when strict).

    ``where`` names the config (``'target_pruning_ratio'``, ``'channel_unit_cfg.units'``).
    """

    def __init__(self, where: str, strict: bool = False):
        self.where, self.strict = where, bool(strict)
        self.ignored: Dict[str, List[str]] = {}  # why -> names
        self.clamped: List[str] = []

    def ignore(self, names: Sequence[str], why: str) -> None:
        """Entries skipped for one reason (``why``: 'units the model does not have')."""
        if names:
            self.ignored.setdefault(why, []).extend(names)

    def clamp(self, what: str) -> None:
        self.clamped.append(what)

    @property
    def message(self) -> str:
        parts = [f"ignored {why}: {sorted(names)}" for why, names in self.ignored.items()]
        if self.clamped:
            parts.append("clamped to the unit's width: " + ", ".join(self.clamped))
        return f"{self.where}: " + "; ".join(parts)

    def finish(self, stacklevel: int = 3) -> None:
        """Warn once about everything collected (nothing collected: nothing happens); strict: raise instead."""
        if not (self.ignored or self.clamped):
            return
        if self.strict:
            raise ConfigError(self.message + " (strict=True; without it these entries are skipped with a warning)")
        warnings.warn(self.message + " (as mmrazor does; strict=True raises instead)", ConfigLeniencyWarning,
                      stacklevel=stacklevel)
