"""SlimmableChannelUnit: a prefix unit restricted to a fixed list of widths (slimmable networks)."""
from typing import Optional, Sequence

from .one_shot import OneShotMutableChannelUnit
from .registry import register_unit


@register_unit
class SlimmableChannelUnit(OneShotMutableChannelUnit):
    """Keeps a prefix whose width must be one of ``candidate_choices`` (compared by the channel count they keep).

    mmrazor's signature and defaults: ``SlimmableChannelUnit(num_channels, candidate_choices=[], choice_mode='number',
    divisor=1, min_value=1, min_ratio=0.9)``; no candidates means the full width only.
    Unlike mmrazor's slimmable unit this does not switch between per-width BatchNorm statistics.
    """

    def __init__(self, num_channels: int, candidate_choices: Optional[Sequence] = None, choice_mode: str = "number",
                 divisor: int = 1, min_value: int = 1, min_ratio: float = 0.9, **kwargs):
        super().__init__(num_channels, [] if candidate_choices is None else candidate_choices, choice_mode, divisor,
                         min_value, min_ratio, **kwargs)
        self._allowed_counts = {self.width_to_count(c) for c in self.candidate_choices}

    def width_to_count(self, choice) -> int:
        count = super().width_to_count(choice)
        allowed = getattr(self, "_allowed_counts", None)  # None while the candidates themselves are checked
        full_width_of_fixed = self.fixed and count == self.num_channels
        if allowed is not None and count not in allowed and not full_width_of_fixed:
            self._fail(f"choice {choice!r} ({count} channels) is not one of the candidate choices "
                       f"{self.candidate_choices}")
        return count
