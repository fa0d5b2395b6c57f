"""A budget: what the pruned model may cost, in FLOPs, parameters and / or measured latency."""
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Dict, Optional

from .cost import METRICS, Cost
from .errors import BudgetError

TARGETS = ("flops", "params", "latency")


@dataclass(frozen=True)
class Budget:
    """Upper limits for the pruned model; ``None`` = no limit on that quantity.

    * ``flops``, ``params``: a fraction of the full (unpruned) model in (0, 1], or an absolute count > 1 (FLOPs of
      one forward of the example input, as ``FlopCounterMode`` counts them). A string ``'50%'`` is a fraction.
    * ``latency``: a fraction in (0, 1] of the full model's measured latency (see :mod:`pyprune.budget.latency`).
    """
    flops: Optional[float] = None
    params: Optional[float] = None
    latency: Optional[float] = None

    def __post_init__(self):
        for name in TARGETS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _parse_value(name, value))
        if all(getattr(self, name) is None for name in TARGETS):
            raise BudgetError(f"a budget needs at least one of {TARGETS}")

    @classmethod
    def from_dict(cls, budget) -> "Budget":
        """From a Budget or a dict such as ``{'flops': 0.5}`` / ``{'params': 10e6, 'latency': '60%'}``."""
        if isinstance(budget, Budget):
            return budget
        if not isinstance(budget, Mapping):
            raise BudgetError(f"a budget must be a dict with keys from {TARGETS}, got {budget!r}")
        unknown = sorted(str(k) for k in budget if k not in TARGETS)
        if unknown:
            raise BudgetError(f"budget: unknown keys {unknown}; known: {list(TARGETS)}")
        return cls(**dict(budget))

    def as_dict(self) -> Dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def limits(self, full: Cost) -> Dict[str, float]:
        """Absolute upper limits ``{metric: value}`` for the counted metrics (flops / params)."""
        return {m: getattr(self, m) if getattr(self, m) > 1.0 else getattr(self, m) * full[m]
                for m in METRICS if getattr(self, m) is not None}

    def fraction(self, target: str, full: Cost) -> float:
        """The limit on ``target`` as a fraction of the full model."""
        value = getattr(self, target)
        if value is None:
            return 1.0
        if target == "latency" or value <= 1.0:
            return value
        return value / full[target]

    def at_step(self, step: int, steps: int, full: Cost) -> "Budget":
        """The budget of step ``step`` of ``steps`` on a linear schedule: fraction ``1 - (1 - f) * step / steps``
        for every target (absolute targets are turned into fractions of ``full`` first)."""
        scaled = {}
        for target in TARGETS:
            if getattr(self, target) is not None:
                fraction = self.fraction(target, full)
                scaled[target] = 1.0 - (1.0 - fraction) * step / steps
        return Budget(**scaled)

    def describe(self, full: Optional[Cost] = None) -> str:
        parts = []
        for target, value in self.as_dict().items():
            if target != "latency" and value > 1.0:
                share = f" ({value / full[target]:.1%})" if full is not None else ""
                parts.append(f"{target} <= {value:,.0f}{share}")
            else:
                parts.append(f"{target} <= {value:.1%}")
        return ", ".join(parts)


def _parse_value(name: str, value) -> float:
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            raise BudgetError(f"budget {name}: cannot read {value!r} as a number or a percentage") from None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise BudgetError(f"budget {name} must be a positive number (a fraction in (0, 1] or an absolute count), "
                          f"got {value!r}")
    if name == "latency" and value > 1.0:
        raise BudgetError(f"budget latency is a fraction of the full model's latency in (0, 1], got {value!r}")
    if value > 1.0 and value != int(value):
        raise BudgetError(f"budget {name}: an absolute {name} count must be a whole number, got {value!r}")
    return float(value)


__all__ = ["Budget", "TARGETS"]
