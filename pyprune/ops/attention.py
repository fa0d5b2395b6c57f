"""DynamicMultiheadAttention: nn.MultiheadAttention over the active embedding channels."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import DynamicChannelMixin
from .compact_state import ChannelSlice
from .cost_terms import CostTerms, LayerCall
from .layer_kind import OneSelectionKind
from .measured_cost import measured_cost_terms

__all__ = ["DynamicMultiheadAttention", "attention_forward", "ATTENTION_TYPES", "WINDOW_ATTENTION_OPS"]


def attention_forward(module: nn.MultiheadAttention, tensors, query: Tensor, key: Tensor, value: Tensor,
                      **options) -> Tuple[Tensor, Optional[Tensor]]:
    """``module``'s attention computed with ``tensors`` = (in_proj_weight ``[3K, K]``, in_proj_bias, out_proj weight
    ``[K, K]``, out_proj bias, bias_k, bias_v) at embedding width ``K = query.shape[-1]``; ``options`` as
    ``nn.MultiheadAttention.forward`` takes them. Returns (output like ``query``, attention weights or None)."""
    in_w, in_b, out_w, out_b, bias_k, bias_v = tensors
    batched = query.dim() == 3
    if module.batch_first and batched:  # the functional form is sequence-first
        query, key, value = (t.transpose(1, 0) for t in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        query, key, value, query.shape[-1], module.num_heads, in_w, in_b, bias_k, bias_v, module.add_zero_attn,
        module.dropout, out_w, out_b, training=module.training, **options)
    return (out.transpose(1, 0) if module.batch_first and batched else out), weights


class _EmbeddingSelection(OneSelectionKind, DynamicChannelMixin):
    """One selection over an attention layer's embedding width ``E`` (channels last), balanced over its heads; the
    q / k / v projection rows it implies (``idx | E+idx | 2E+idx``) are derived once per selection. Its cost is
    measured (``pyprune.ops.measured_cost``): what ``FlopCounterMode`` counts for attention depends on the
    ``scaled_dot_product_attention`` backend."""

    @classmethod
    def embedding_width(cls, module: nn.Module) -> int:
        """``E`` of ``module`` (a plain or dynamic attention layer of this class's type)."""
        raise NotImplementedError

    @classmethod
    def channel_counts(cls, module: nn.Module) -> Tuple[int, int]:
        return cls.embedding_width(module), cls.embedding_width(module)

    @classmethod
    def selection_groups(cls, module: nn.Module) -> int:
        return module.num_heads

    @classmethod
    def cost_terms(cls, module: nn.Module, calls: Sequence[LayerCall]) -> CostTerms:
        return measured_cost_terms(cls, module, calls)

    @classmethod
    def probe_inputs(cls, module: nn.Module):
        return []  # no single input: a subclass with its own forward stays fixed

    def _embedding_width(self) -> int:
        return type(self).embedding_width(self)

    def _channel_dims(self, x: Tensor) -> Tuple[int, str]:
        return x.dim() - 1, "embedding channels"

    def _after_selection_change(self) -> None:
        index, width = self._out_index, self._embedding_width()
        self._qkv_rows = None if index is None else torch.cat([index, index + width, index + 2 * width])

    def _projection_layout(self) -> List[ChannelSlice]:
        """The slices of the first four channel tensors: qkv weight rows ``idx | E+idx | 2E+idx`` and columns
        ``idx`` (compact ``[3K, K]``), qkv bias rows (``[3K]``), output weight rows and columns ``idx``
        (``[K, K]``), output bias ``idx`` (``[K]``)."""
        index = self._out_index
        if index is None:
            return []
        names, (qkv_w, qkv_b, out_w, out_b) = self._channel_tensors, self._source_tensors()[:4]
        pieces = [(qkv_w, self._qkv_rows, index), (qkv_b, self._qkv_rows, None), (out_w, index, index),
                  (out_b, index, None)]
        return [ChannelSlice(name, tensor, rows, cols) for name, (tensor, rows, cols) in zip(names, pieces)
                if tensor is not None]


class DynamicMultiheadAttention(_EmbeddingSelection, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose embedding width ``E`` is pruned to ``K`` channels: query / key / value
    ``[*, K]`` in, ``[*, K]`` out, ``num_heads`` kept (``K / num_heads`` per head).

    ``nn.MultiheadAttention`` ties the q / k / v widths to the embedding width, so one selection serves all of them
    (as Torch-Pruning couples them too): the kept embedding channels ``idx`` select the columns of ``in_proj_weight``,
    its rows ``idx``, ``E + idx`` and ``2E + idx``, and rows and columns ``idx`` of ``out_proj``. A selection must
    keep the same count in every head's block of ``E / num_heads`` channels. Exports to ``nn.MultiheadAttention(K,
    num_heads)``. Only the packed layout (``kdim == vdim == embed_dim``) is supported.
    """

    _torch_type = nn.MultiheadAttention
    _channel_tensors = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "bias_k", "bias_v")

    @classmethod
    def _check_convertible(cls, module: nn.Module) -> None:
        if not module._qkv_same_embed_dim:
            raise ConfigError(f"{cls.__name__}: only attention with kdim == vdim == embed_dim can be pruned, got "
                              f"kdim={module.kdim}, vdim={module.vdim}, embed_dim={module.embed_dim}")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_convertible(self)

    @classmethod
    def embedding_width(cls, module: nn.MultiheadAttention) -> int:
        return module.embed_dim

    def _source_tensors(self):
        return [self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias, self.bias_k,
                self.bias_v]

    def _compact_layout(self) -> List[ChannelSlice]:
        layout = self._projection_layout()
        if self._out_index is not None:  # bias_k / bias_v [1, 1, E]: channels on dim 2
            layout += [ChannelSlice(name, bias, self._out_index, dim=2) for name, bias in
                       zip(self._channel_tensors[4:], self._source_tensors()[4:]) if bias is not None]
        return layout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        for x in (query, key, value):
            self._check_input(x)
        return attention_forward(self, self.active_tensors(), query, key, value, key_padding_mask=key_padding_mask,
                                 need_weights=need_weights, attn_mask=attn_mask,
                                 average_attn_weights=average_attn_weights, is_causal=is_causal)

    def _static_module(self) -> nn.MultiheadAttention:
        return nn.MultiheadAttention(self.active_out_channels, self.num_heads, self.dropout,
                                     bias=self.in_proj_bias is not None, add_bias_kv=self.bias_k is not None,
                                     add_zero_attn=self.add_zero_attn, batch_first=self.batch_first, device="meta")


# ------------------------------------------------------------------------------------- Swin window attention
def _window_attention_types() -> Tuple[type, ...]:
    """torchvision's Swin attention modules (v1, v2), when torchvision is installed."""
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
    except ImportError:
        return ()
    return ShiftedWindowAttention, ShiftedWindowAttentionV2


class _DynamicWindowAttention(_EmbeddingSelection):
    """Swin's ``ShiftedWindowAttention`` (v1 / v2) with its embedding width ``C`` pruned to ``K``: x ``[B, H, W, K]``.

    As for ``DynamicMultiheadAttention``, one selection ``idx`` serves the input, the q / k / v widths and the
    output (rows ``idx | C+idx | 2C+idx`` of ``qkv``, rows and columns ``idx`` of ``proj``), balanced over the heads;
    the per-head position biases (and v2's ``logit_scale`` / ``cpb_mlp``) are untouched. Exports to the same
    torchvision class at ``dim=K``.
    """

    _channel_tensors = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias")

    @classmethod
    def embedding_width(cls, module: nn.Module) -> int:
        return module.qkv.in_features

    def _source_tensors(self):
        return [self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias]

    def _compact_layout(self) -> List[ChannelSlice]:
        return self._projection_layout()

    def forward(self, x: Tensor) -> Tensor:
        from torchvision.models.swin_transformer import shifted_window_attention
        self._check_input(x)
        qkv_w, qkv_b, proj_w, proj_b = self.active_tensors()
        return shifted_window_attention(
            x, qkv_w, proj_w, self.get_relative_position_bias(), self.window_size, self.num_heads,
            shift_size=self.shift_size, attention_dropout=self.attention_dropout, dropout=self.dropout,
            qkv_bias=qkv_b, proj_bias=proj_b, logit_scale=getattr(self, "logit_scale", None), training=self.training)

    def export(self) -> nn.Module:
        """The torchvision class at ``dim=K`` with the compact qkv / proj and everything else copied."""
        with torch.no_grad():
            state = {k: v.detach().clone() for k, v in self.state_dict().items() if isinstance(v, Tensor)}
            state.update({k: v.detach().clone() for k, v in zip(self._channel_tensors, self.tensor_provider.tensors_to_export(self))
                          if v is not None})
        with torch.device("meta"):
            static = self._torch_type(self.active_out_channels, list(self.window_size), list(self.shift_size),
                                      self.num_heads, qkv_bias=self.qkv.bias is not None,
                                      proj_bias=self.proj.bias is not None,
                                      attention_dropout=self.attention_dropout, dropout=self.dropout)
        static.load_state_dict(state, assign=True)
        return static.train(self.training)


WINDOW_ATTENTION_OPS = {base: type(f"Dynamic{base.__name__}", (_DynamicWindowAttention, base),
                                   {"_torch_type": base, "__module__": __name__})
                        for base in _window_attention_types()}
ATTENTION_TYPES: Tuple[type, ...] = (nn.MultiheadAttention,) + tuple(WINDOW_ATTENTION_OPS)
