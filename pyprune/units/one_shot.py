"""OneShotMutableChannelUnit: a prefix unit whose random choices come from a list of candidate widths."""
from typing import Any, Dict, Optional, Sequence

import torch

from ..errors import ChannelSelectionError, ConfigError
from .registry import register_unit
from .sequential import SequentialMutableChannelUnit

DEFAULT_CANDIDATE_RATIOS = (0.25, 0.5, 0.75, 1.0)


@register_unit
class OneShotMutableChannelUnit(SequentialMutableChannelUnit):
    """Keeps a prefix; ``sample_choice`` draws uniformly from ``candidate_choices`` (for one-shot NAS supernets).

    ``candidate_choices``: ratios (ratio mode) or counts (number mode); default 1/4, 1/2, 3/4 and all channels.
    Any valid choice can still be set; the candidates only bound sampling and ``min_choice`` / ``max_choice``.
    """

    def __init__(self, num_channels: int, choice_mode: str = "ratio", divisor: int = 1, min_value: int = 1,
                 min_ratio: float = 0.0, candidate_choices: Optional[Sequence] = None, **kwargs):
        super().__init__(num_channels, choice_mode, divisor, min_value, min_ratio, **kwargs)
        if candidate_choices is None:
            candidate_choices = [self.choice_from_ratio(r) for r in DEFAULT_CANDIDATE_RATIOS]
        self.candidate_choices = self._check_candidates(candidate_choices)
        if not self.fixed:
            self.apply_count(self.choice_to_count(self.candidate_choices[-1]))

    def _check_candidates(self, candidates) -> list:
        if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__iter__") or len(candidates) == 0:
            raise ConfigError(f"unit {self.name}: candidate_choices must be a non-empty list, got {candidates!r}")
        try:
            for choice in candidates:
                self.width_to_count(choice)
        except ChannelSelectionError as error:
            raise ConfigError(f"bad candidate_choices: {error}") from None
        return sorted(dict.fromkeys(candidates))

    def sample_choice(self):
        pick = int(torch.randint(len(self.candidate_choices), ()))
        return self.count_to_choice(self.width_to_count(self.candidate_choices[pick]))

    @property
    def max_choice(self):
        return self.count_to_choice(self.width_to_count(self.candidate_choices[-1]))

    @property
    def min_choice(self):
        return self.count_to_choice(self.width_to_count(self.candidate_choices[0]))

    @property
    def init_args(self) -> Dict[str, Any]:
        return {**super().init_args, "candidate_choices": list(self.candidate_choices)}
