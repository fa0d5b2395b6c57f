"""SlimmableChannelUnit: a prefix unit restricted to a fixed list of widths (slimmable networks)."""
from typing import Sequence

from .one_shot import OneShotMutableChannelUnit
from .registry import register_unit


@register_unit
class SlimmableChannelUnit(OneShotMutableChannelUnit):
    """Keeps a prefix whose width must be one of ``candidate_choices`` (compared by the channel count they keep).

    Unlike mmrazor's slimmable unit this does not switch between per-width BatchNorm statistics.
    """

    def __init__(self, num_channels: int, choice_mode: str = "number", divisor: int = 1, min_value: int = 1,
                 min_ratio: float = 0.0, candidate_choices: Sequence = None, **kwargs):
        super().__init__(num_channels, choice_mode, divisor, min_value, min_ratio,
                         candidate_choices=candidate_choices, **kwargs)
        self._allowed_counts = {self.width_to_count(c) for c in self.candidate_choices}

    def width_to_count(self, choice) -> int:
        count = super().width_to_count(choice)
        allowed = getattr(self, "_allowed_counts", None)  # None while the candidates themselves are checked
        full_width_of_fixed = self.fixed and count == self.num_channels
        if allowed is not None and count not in allowed and not full_width_of_fixed:
            self._fail(f"choice {choice!r} ({count} channels) is not one of the candidate choices "
                       f"{self.candidate_choices}")
        return count
