"""SlimmableChannelUnit: a prefix unit restricted to a fixed list of widths, with a private BN per width."""
import warnings
from typing import List, Optional, Sequence

from torch import nn

from .. import ops
from ..ops.switchable_bn import SwitchableBatchNorm2d
from .modules import replace_modules
from .one_shot import OneShotMutableChannelUnit
from .registry import register_unit


@register_unit
class SlimmableChannelUnit(OneShotMutableChannelUnit):
    """Keeps a prefix whose width must be one of ``candidate_choices`` (compared by the channel count they keep);
    its BatchNorm2d layers switch to a private set of affine parameters and running statistics per candidate width.

    mmrazor's signature and defaults: ``SlimmableChannelUnit(num_channels, candidate_choices=[], choice_mode='number',
    divisor=1, min_value=1, min_ratio=0.9)``; no candidates means the full width only.

    Switchable BN: when the unit binds to the model (``ChannelMutator.prepare_from_supernet`` or
    :meth:`prepare_for_pruning`) each of its ``DynamicBatchNorm2d`` layers is replaced, in the model, by a
    :class:`~pyprune.ops.switchable_bn.SwitchableBatchNorm2d` (sharing its tensors) with one BN per candidate count
    (mmrazor's ``prepare_for_pruning`` does the same conversion). A BN subclass served through its own forward
    (timm's ``BatchNormAct2d``) has no switchable form: it keeps one set of statistics for all widths, with a
    warning naming it.
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

    @property
    def candidate_counts(self) -> List[int]:
        """The candidate widths as channel counts, ascending."""
        return sorted(self._allowed_counts)

    def bind(self, model: nn.Module) -> None:
        """Resolve the unit's layers, then give each of its BatchNorm2d layers one BN per candidate width (see the
        class docstring). Binding again keeps switchable BNs that exist (their candidate sets included)."""
        super().bind(model)
        if not self.is_mutable:
            return
        replacements, kept_shared = {}, []
        for name, layer in self._modules.items():
            if isinstance(layer, SwitchableBatchNorm2d):
                if not len(layer.candidate_bn):
                    layer.init_candidates(self.candidate_counts)
            elif type(layer) is ops.DynamicBatchNorm2d:
                switchable = SwitchableBatchNorm2d.convert_from(layer)
                switchable.pyprune_name = name
                switchable.init_candidates(self.candidate_counts)
                replacements[name] = switchable
            elif isinstance(layer, nn.BatchNorm2d):
                kept_shared.append(f"{name!r} ({type(layer).__name__})")
        if kept_shared:
            warnings.warn(f"unit {self.name}: {', '.join(kept_shared)} cannot switch BN statistics per width; "
                          f"they share one set across the candidate widths", stacklevel=3)
        if replacements:
            replace_modules(model, replacements)
            super().bind(model)
