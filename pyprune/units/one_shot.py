"""OneShotMutableChannelUnit: a prefix unit whose random choices come from a list of candidate widths."""
from typing import Any, Dict, Optional, Sequence

import torch

from ..errors import ChannelSelectionError, ConfigError
from .registry import register_unit
from .sequential import SequentialMutableChannelUnit

DEFAULT_CANDIDATE_RATIOS = (0.5, 1.0)  # mmrazor's default candidate list


@register_unit
class OneShotMutableChannelUnit(SequentialMutableChannelUnit):
    """Keeps a prefix; ``sample_choice`` draws uniformly from ``candidate_choices`` (for one-shot NAS supernets).

    Signature and defaults as mmrazor's: ``OneShotMutableChannelUnit(48, [20, 30, 40], choice_mode='number',
    divisor=8)``. ``candidate_choices``: counts (number mode; a float there is a ratio, turned into a count) or
    ratios (ratio mode), default ``[0.5, 1.0]``; an empty list means the full width only. The candidates are
    rounded the way any choice is (``[20, 30, 40]`` with ``divisor=8`` gives ``[24, 32, 40]``; ratios come back as
    the kept fraction they realize), sorted, duplicates dropped. The unit starts at the largest candidate.

    Unlike mmrazor, any valid choice can still be set: the candidates bound sampling and ``min_choice`` /
    ``max_choice`` (:class:`SlimmableChannelUnit` is the unit that refuses other widths).
    """

    def __init__(self, num_channels: int, candidate_choices: Optional[Sequence] = None, choice_mode: str = "ratio",
                 divisor: int = 1, min_value: int = 1, min_ratio: float = 0.9, **kwargs):
        super().__init__(num_channels, choice_mode, divisor, min_value, min_ratio, **kwargs)
        if candidate_choices is None:
            candidate_choices = list(DEFAULT_CANDIDATE_RATIOS)
        self.candidate_choices = self._rounded_candidates(candidate_choices)
        if not self.fixed:
            self.apply_count(self.width_to_count(self.candidate_choices[-1]))

    def _rounded_candidates(self, candidates) -> list:
        if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__iter__"):
            raise ConfigError(f"unit {self.name}: candidate_choices must be a list, got {candidates!r}")
        if len(candidates) == 0:
            return [self.max_choice_of_width]
        try:
            return sorted({self.count_to_choice(self.width_to_count(choice)) for choice in candidates})
        except ChannelSelectionError as error:
            raise ConfigError(f"bad candidate_choices: {error}") from None

    @property
    def max_choice_of_width(self):
        """The full width as a choice in this unit's mode."""
        return self.count_to_choice(self.num_channels)

    def sample_choice(self):
        pick = int(torch.randint(len(self.candidate_choices), ()))
        return self.candidate_choices[pick]

    @property
    def max_choice(self):
        return self.candidate_choices[-1]

    @property
    def min_choice(self):
        return self.candidate_choices[0]

    @property
    def init_args(self) -> Dict[str, Any]:
        return {**super().init_args, "candidate_choices": list(self.candidate_choices)}
