"""DynamicEmbedding: nn.Embedding over the active embedding channels (the columns of its table)."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ChannelSelectionError, ConfigError
from .base import DynamicChannelMixin
from .compact_state import ChannelSlice
from .cost_terms import Bilinear, CostTerms, LayerCall, parameter_counts

__all__ = ["DynamicEmbedding"]


class DynamicEmbedding(DynamicChannelMixin, nn.Embedding):
    """``nn.Embedding`` whose embedding dim ``D`` is pruned to ``K``: ids ``[*]`` -> ``[*, K]``, looked up in the
    compact table ``weight[:, idx]`` ``[num_embeddings, K]``.

    The output channels are the table's columns; its rows are token ids, not channels, so only the output side
    has a selection (``channel_counts`` gives ``num_embeddings`` as the input count, which no selection may
    prune). ``padding_idx``, ``max_norm`` (renormalising the kept columns of the looked-up rows, written back into
    the full table as ``F.embedding`` does in place), ``norm_type`` and ``scale_grad_by_freq`` are kept; sparse
    gradients cannot pass the channel gather and are refused. A table shared with an output layer (tied input /
    output embeddings) is read by both at their own selections; export keeps the tie where both keep the same
    channels (``pyprune.ops.tied``). Exports to ``nn.Embedding(num_embeddings, K)``.
    """

    _torch_type = nn.Embedding
    _channel_tensors = ("weight",)

    @classmethod
    def _check_convertible(cls, module: nn.Module) -> None:
        if module.sparse:
            raise ConfigError(f"{cls.__name__}: an embedding with sparse=True cannot be pruned (a sparse gradient "
                              f"cannot pass the channel gather)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_convertible(self)

    @classmethod
    def channel_counts(cls, module: nn.Module) -> Tuple[int, int]:
        return module.embedding_dim, module.num_embeddings

    @classmethod
    def importance_rows(cls, module: nn.Module) -> Optional[Tensor]:
        """The table transposed, ``[D, num_embeddings]``: one row per embedding channel."""
        return cls.full_tensor(module, "weight").t()

    # A subclass with its own forward (Gemma's scaled word embedding: ``super().forward(ids) * embed_scale``) is
    # served when, on ids [2, 5], its output's last dim is the embedding channels and keeping some of them gives
    # the full output at those channels; only the output side is probed (the ids carry no channels).
    probe_outputs_only = True

    @classmethod
    def probe_inputs(cls, module: nn.Module):
        return [((2, 5), -1)]

    @classmethod
    def probe_input(cls, module: nn.Module, shape: Tuple[int, ...]) -> Tensor:
        """Token ids of ``shape`` (the probe's input; random over the table's rows)."""
        device = module.weight.device
        return torch.randint(0, module.num_embeddings, shape, device=device)

    @classmethod
    def cost_terms(cls, module: nn.Module, calls: Sequence[LayerCall]) -> CostTerms:
        """No FLOPs (a lookup); the table ``[num_embeddings, D]`` is ``in * out`` elements (``in`` is
        ``num_embeddings``, which no selection prunes)."""
        return CostTerms(Bilinear(), parameter_counts(module, {"weight": Bilinear(a=1.0)}))

    def active_attributes(self):
        return {"embedding_dim": self.active_out_channels}

    def set_in_index(self, index: Optional[Tensor]) -> None:
        """Only ``None``: the rows are token ids (selecting them would renumber the vocabulary)."""
        if index is not None:
            raise ChannelSelectionError(f"{self.pyprune_name} ({type(self).__name__}): an embedding's rows are token "
                                        f"ids, not channels; only its embedding dim (the output channels) is pruned")

    def _check_input(self, x: Tensor) -> None:
        """The ids carry no channels: only their dtype is checked."""
        if x.is_floating_point() or x.is_complex():
            raise ChannelSelectionError(f"{self.pyprune_name} ({type(self).__name__}): expected integer ids, got a "
                                        f"{x.dtype} tensor of shape {list(x.shape)}")

    def _compact_layout(self) -> List[ChannelSlice]:
        if self._out_index is None:
            return []
        return [ChannelSlice("weight", self._source_tensors()[0], None, self._out_index)]

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        (weight,) = self.active_tensors()
        out = F.embedding(x, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                          self.sparse)
        if self.max_norm is not None:  # F.embedding renormalised rows of the compact table in place
            self.carry_writes({"weight": weight})
        return out

    def _static_module(self) -> nn.Embedding:
        return nn.Embedding(self.num_embeddings, self.active_out_channels, self.padding_idx, self.max_norm,
                            self.norm_type, self.scale_grad_by_freq, self.sparse, device="meta")
