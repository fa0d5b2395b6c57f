"""SwitchableBatchNorm2d: batch norm with its own affine parameters and running statistics per candidate width.

Slimmable networks train several widths of one network with shared convolution weights. The features a channel
sees differ from width to width (each width sums over a different number of input channels), so one set of BN
statistics shared by all widths is right for none of them. A switchable BN keeps one private ``nn.BatchNorm2d``
per candidate width and normalises with the set of the active width (Yu et al., "Slimmable Neural Networks").

Layout (as mmrazor's ``SwitchableBatchNorm2d``): the layer's own ``weight`` / ``bias`` / running statistics serve
the full width; every other candidate ``K`` is a plain ``nn.BatchNorm2d(K)`` in ``candidate_bn[str(K)]``, so the
state_dict has the plain layer's keys plus ``candidate_bn.<K>.*``. Which set is used is decided by the active
*count* only: slimmable units keep prefixes, so width ``K`` always means channels ``0 .. K-1``.

It is not the default DynamicOp of ``nn.BatchNorm2d`` (that stays :class:`DynamicBatchNorm2d`, whose one set of
statistics follows any selection): :class:`pyprune.units.SlimmableChannelUnit` installs it on the BNs of its unit
when it binds to the model. It is checked at import as a complete DynamicOp for ``nn.BatchNorm2d``, the check every
``DYNAMIC_OPS`` entry passes.
"""
import copy
from typing import Iterable, List

import torch
from torch import Tensor, nn

from ..errors import ChannelSelectionError, ConfigError
from .batchnorm import DynamicBatchNorm2d
from .compact_state import ChannelSlice
from .kind_table import check_dynamic_op

__all__ = ["SwitchableBatchNorm2d"]


class SwitchableBatchNorm2d(DynamicBatchNorm2d):
    """``nn.BatchNorm2d`` with one BN per candidate width: x ``[N, K, H, W]`` -> ``[N, K, H, W]``.

    * ``K == num_features``: the layer's own tensors (exactly :class:`DynamicBatchNorm2d` at full width);
    * ``K`` another candidate: ``candidate_bn[str(K)]``, a plain ``nn.BatchNorm2d(K)`` (train mode updates only its
      statistics; the other widths' are untouched);
    * any other ``K``: :class:`~pyprune.errors.ChannelSelectionError` naming the layer, the width and the candidates.

    :meth:`init_candidates` creates the per-width sets, each a copy of the first ``K`` channels of the layer's own
    affine parameters and running statistics (a fresh model gives mmrazor's fresh BNs; a pretrained one starts each
    width from the full BN's values). :meth:`export` at width ``K`` is a plain ``nn.BatchNorm2d`` holding that
    width's set (copied).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.candidate_bn = nn.ModuleDict()

    @classmethod
    def convert_from(cls, module: nn.Module) -> "SwitchableBatchNorm2d":
        """A switchable BN sharing ``module``'s tensors (an ``nn.BatchNorm2d`` or its DynamicOp), with no candidate
        sets yet (:meth:`init_candidates`); ``module`` is left untouched."""
        op = super().convert_from(module)
        if not isinstance(op.__dict__["_modules"].get("candidate_bn"), nn.ModuleDict):
            op.candidate_bn = nn.ModuleDict()
        return op

    # ------------------------------------------------------------------------------------------------ candidates
    @property
    def candidate_widths(self) -> List[int]:
        """The widths this layer normalises, ascending (the full width always: its own tensors serve it)."""
        return sorted({int(key) for key in self.candidate_bn} | {self.num_features})

    def init_candidates(self, candidates: Iterable[int]) -> None:
        """Create a private BN for each candidate width (channel counts ``1 .. num_features``; the full width uses
        the layer's own tensors). Refused with ConfigError naming the layer, nothing changed, when a candidate is
        not such a count or the layer has candidate sets already."""
        candidates = list(candidates)
        bad = [c for c in candidates
               if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= self.num_features]
        if bad:
            raise ConfigError(f"{self.pyprune_name} (SwitchableBatchNorm2d): candidate widths must be channel "
                              f"counts in [1, {self.num_features}], got {bad}")
        if len(self.candidate_bn):
            raise ConfigError(f"{self.pyprune_name} (SwitchableBatchNorm2d): has candidate widths "
                              f"{self.candidate_widths} already")
        for count in sorted(set(candidates) - {self.num_features}):
            self.candidate_bn[str(count)] = self._prefix_copy(count)

    @torch.no_grad()
    def _prefix_copy(self, count: int) -> nn.BatchNorm2d:
        """A plain ``nn.BatchNorm2d(count)`` holding copies of the first ``count`` channels of the own tensors."""
        bn = nn.BatchNorm2d(count, self.eps, self.momentum, self.affine, self.track_running_stats,
                            device="meta", **self._bias_kwargs())
        state = {}
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = self.full_tensor(self, name)
            if tensor is not None:
                state[name] = tensor[:count].clone()
        if self.num_batches_tracked is not None:
            state["num_batches_tracked"] = self.num_batches_tracked.detach().clone()
        bn.load_state_dict(state, assign=True)
        for name, parameter in self._parameters.items():
            if parameter is not None:
                getattr(bn, name).requires_grad_(parameter.requires_grad)
        return bn.train(self.training)

    def supernet_only_parameters(self) -> List[nn.Parameter]:
        """Every per-width set's parameters: the export holds one width's tensors, which the layer kind's cost
        terms count at the active width already."""
        return list(self.candidate_bn.parameters())

    def _active_candidate(self):
        """The private BN of the active width, None at full width; ChannelSelectionError for any other width."""
        count = self.active_out_channels
        if count == self.num_features:
            return None
        bn = self.candidate_bn[str(count)] if str(count) in self.candidate_bn else None
        if bn is None:
            raise ChannelSelectionError(f"{self.pyprune_name} (SwitchableBatchNorm2d): {count} active channels is "
                                        f"not one of its candidate widths {self.candidate_widths}")
        return bn

    # ---------------------------------------------------------------------------------------------------- forward
    def _compact_layout(self) -> List[ChannelSlice]:
        # a candidate width reads its own [K] tensors whole: nothing of the full tensors is gathered or held
        if str(self.active_out_channels) in self.candidate_bn:
            return []
        return super()._compact_layout()

    def forward(self, x: Tensor) -> Tensor:
        bn = self._active_candidate()
        if bn is None:
            return super().forward(x)
        self._check_input_dim(x)
        self._check_input(x)
        return bn(x)

    def export(self) -> nn.Module:
        """The plain ``nn.BatchNorm2d`` of the active width: the own tensors at full width, else a copy of that
        width's private BN; in the same train / eval mode. The layer is left unchanged."""
        bn = self._active_candidate()
        if bn is None:
            return super().export()
        static = copy.deepcopy(bn)
        return static.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, candidate_widths={self.candidate_widths}"


check_dynamic_op(nn.BatchNorm2d, SwitchableBatchNorm2d)  # complete, as every DYNAMIC_OPS entry must be
