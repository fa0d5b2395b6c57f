"""DMCPChannelUnit: a unit whose width is a Markov chain over channel groups (DMCP, Guo et al., CVPR 2020).

Differentiable Markov Channel Pruning splits a unit's channels (in each of its ``groups`` equal blocks) into a prefix
of ``min_ch`` channels that is always kept and ``num_groups`` groups of ``group_size`` channels after it::

    block = num_channels // groups
    group_size = int(rate_offset * block / max_rate)
    num_groups = int((max_rate - min_rate) / rate_offset + 1e-4)
    min_ch = block - group_size * num_groups

(``pruning_cfg = (min_rate, max_rate, rate_offset)``, mmrazor's ``(0.1, 1, 0.05)``: 18 groups of 5 % of the width
after a 10 % prefix). Group ``k`` is kept only if group ``k - 1`` is: the chain's transition probabilities are
``p_k = exp(-max(a_k, 0))`` for the unit's architecture parameters ``a`` (float ``[num_groups]``, zeros at the
start: every group kept), so group ``k`` is kept with the marginal probability ``P_k = p_1 * ... * p_k`` and the
expected width is ``groups * (min_ch + group_size * sum_k P_k)``, a differentiable function of ``a``.

The unit keeps a prefix of every block (it is a :class:`SequentialMutableChannelUnit`), so "group ``k`` kept" is "the
first ``min_ch + k * group_size`` channels of every block kept". It holds no parameters itself: the architecture
parameters belong to :class:`~pyprune.mutators.DMCPChannelMutator`, which hands them to the methods here.
A unit too narrow for one channel per group (``group_size == 0``) has no chain (``num_groups == 0``) and keeps its
full width under DMCP's sampling; any width can still be set on it as on every sequential unit.
"""
import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError
from .registry import register_unit
from .sequential import SequentialMutableChannelUnit

DEFAULT_PRUNING_CFG = (0.1, 1.0, 0.05)


def check_pruning_cfg(pruning_cfg, where: str) -> Tuple[float, float, float]:
    """``(min_rate, max_rate, rate_offset)`` as floats with ``0 < min_rate <= max_rate <= 1`` and ``0 < rate_offset
    <= max_rate``; anything else -> ConfigError naming ``pruning_cfg``."""
    def real(value):
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not isinstance(pruning_cfg, Sequence) or isinstance(pruning_cfg, str) or len(pruning_cfg) != 3 \
            or not all(real(v) for v in pruning_cfg):
        raise ConfigError(f"{where}: pruning_cfg must be three numbers (min_rate, max_rate, rate_offset), got "
                          f"{pruning_cfg!r}")
    low, high, offset = (float(v) for v in pruning_cfg)
    if not 0.0 < low <= high <= 1.0 or not 0.0 < offset <= high:
        raise ConfigError(f"{where}: pruning_cfg (min_rate, max_rate, rate_offset) needs 0 < min_rate <= max_rate "
                          f"<= 1 and 0 < rate_offset <= max_rate, got {pruning_cfg!r}")
    return low, high, offset


@register_unit
class DMCPChannelUnit(SequentialMutableChannelUnit):
    """A sequential unit with DMCP's channel groups (see the module docstring); mmrazor's init args and defaults
    (``choice_mode='number'``, ``min_ratio=0.5``).

    :meth:`set_pruning_cfg` (called by the mutator when it prepares the model) fixes :attr:`arch_attr`
    ``= (group_size, num_groups, min_ch)``, per block. The methods taking ``arch_param`` (float ``[num_groups]``)
    are pure functions of it: marginal probabilities, the expected width, the scale of each channel in the
    architecture step, and a width drawn from the chain.
    """

    def __init__(self, num_channels: int, choice_mode: str = "number", divisor: int = 1, min_value: int = 1,
                 min_ratio: float = 0.5, **kwargs):
        super().__init__(num_channels, choice_mode, divisor, min_value, min_ratio, **kwargs)
        self.arch_attr: Tuple[int, int, int] = (0, 0, self.num_channels)

    # ------------------------------------------------------------------------------------------------- the grid
    def set_pruning_cfg(self, pruning_cfg) -> None:
        """Split every block into ``min_ch`` + ``num_groups * group_size`` channels (``pruning_cfg`` as mmrazor's
        mutator takes it). A grid whose prefix would be empty is refused (ConfigError naming the unit)."""
        low, high, offset = check_pruning_cfg(pruning_cfg, f"unit {self.name}")
        block = self.num_channels // self.groups
        group_size = int(offset * block / high)
        num_groups = int((high - low) / offset + 1e-4) if group_size > 0 else 0
        min_ch = block - group_size * num_groups
        if min_ch <= 0:
            raise ConfigError(f"unit {self.name}: pruning_cfg {tuple(pruning_cfg)!r} leaves no channel always kept "
                              f"({num_groups} groups of {group_size} in a block of {block})")
        self.arch_attr = (group_size, num_groups, min_ch)

    @property
    def group_size(self) -> int:
        return self.arch_attr[0]

    @property
    def num_groups(self) -> int:
        """Groups of the chain (0: the unit keeps its full width under DMCP's sampling)."""
        return self.arch_attr[1]

    @property
    def min_channels(self) -> int:
        """Channels of one block that are always kept."""
        return self.arch_attr[2]

    def grid_count(self, kept_groups: int) -> int:
        """The unit's width when the first ``kept_groups`` groups (of every block) are kept."""
        if self.num_groups == 0:
            return self.num_channels
        return self.groups * (self.min_channels + self.group_size * kept_groups)

    # ------------------------------------------------------------------------------------------------ the chain
    @staticmethod
    def transition_probabilities(arch_param: Tensor) -> Tensor:
        """``exp(-max(a, 0))``: the probability of keeping group ``k`` when group ``k - 1`` is kept, ``[num_groups]``.

        The gradient passes at ``a == 0`` (``torch.clamp``'s stops there; the parameters start at 0, which would
        make the start a stationary point) and is zero for ``a < 0``."""
        return torch.exp(-torch.where(arch_param >= 0, arch_param, torch.zeros_like(arch_param)))

    def marginal_probabilities(self, arch_param: Tensor) -> Tensor:
        """The probability that group ``k`` is kept, ``cumprod`` of the transitions: float ``[num_groups]``."""
        return torch.cumprod(self.transition_probabilities(arch_param), dim=0)

    def expected_channels(self, arch_param: Tensor) -> Tensor:
        """The expected width, a 0-dim tensor differentiable w.r.t. ``arch_param`` (the full width as a constant
        tensor when the unit has no chain)."""
        if self.num_groups == 0:
            return arch_param.new_tensor(float(self.num_channels))
        kept = self.marginal_probabilities(arch_param).sum()
        return self.groups * (self.min_channels + self.group_size * kept)

    def expected_count(self, arch_param: Tensor) -> int:
        """The expected width as a channel count: rounded down, as mmrazor's sequential mask takes a fractional
        count, then to a multiple of ``groups`` (and the unit's own rounding)."""
        expected = float(self.expected_channels(arch_param.detach()))
        count = max(self.groups, int(math.floor(expected + 1e-6)) // self.groups * self.groups)
        return self._round(min(count, self.num_channels))

    def sample_chain(self, arch_param: Tensor, generator: Optional[torch.Generator] = None) -> int:
        """A width drawn from the chain ("direct" sampling): walk the groups, keep group ``k`` with probability
        ``p_k`` and stop at the first group dropped."""
        if self.num_groups == 0:
            return self.num_channels
        transitions = self.transition_probabilities(arch_param.detach()).cpu().double()
        draws = torch.rand(self.num_groups, generator=generator, dtype=torch.float64)
        dropped = (draws > transitions).nonzero()
        kept = self.num_groups if dropped.numel() == 0 else int(dropped[0])
        return self.grid_count(kept)

    def sample_grid(self, generator: Optional[torch.Generator] = None) -> int:
        """A width uniform over the grid (mmrazor's "random": 0 .. num_groups groups kept, both included)."""
        if self.num_groups == 0:
            return self.num_channels
        return self.grid_count(int(torch.randint(0, self.num_groups + 1, (), generator=generator)))

    def channel_scale(self, arch_param: Tensor) -> Tensor:
        """Float ``[num_channels]``: 1 on the always-kept prefix of every block, ``P_k`` on group ``k``'s
        channels. The architecture step multiplies the unit's outputs by it, so the task loss reaches ``a``."""
        block = self.num_channels // self.groups
        scale = arch_param.new_ones(block) if self.num_groups == 0 else torch.cat([
            arch_param.new_ones(self.min_channels),
            self.marginal_probabilities(arch_param).repeat_interleave(self.group_size)])
        return scale.repeat(self.groups)


__all__ = ["DMCPChannelUnit", "DEFAULT_PRUNING_CFG", "check_pruning_cfg"]
