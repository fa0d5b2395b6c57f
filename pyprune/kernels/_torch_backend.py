"""Pure-torch implementation of the channel kernels (index_select based).

Used when the compiled extension is not built, or when ``PYPRUNE_BACKEND=torch``. Autograd comes for free from
``index_select``; the functions mirror the semantics of the ``torch.ops.pyprune`` ops exactly.
"""
from typing import List, Optional, Sequence

import torch
from torch import Tensor


def _select_rows_per_group(tensor: Tensor, in_index: Tensor) -> Tensor:
    """tensor: [K_out, C_in, *rest]; in_index: [G, K_in_g] -> [K_out, K_in_g, *rest] (rows split evenly in G)."""
    groups, per_group = in_index.shape
    rows = tensor.shape[0] // groups
    blocks = tensor.reshape(groups, rows, *tensor.shape[1:])
    index = in_index.reshape(groups, 1, per_group, *([1] * (tensor.dim() - 2)))
    index = index.expand(groups, rows, per_group, *tensor.shape[2:])
    return torch.gather(blocks, 2, index).reshape(tensor.shape[0], per_group, *tensor.shape[2:])


def gather_channels(tensor: Tensor, out_index: Optional[Tensor] = None, in_index: Optional[Tensor] = None,
                    dtype: Optional[torch.dtype] = None, memory_format: Optional[torch.memory_format] = None) -> Tensor:
    """Return ``tensor[out_index][:, in_index]`` as a new tensor of ``dtype`` in ``memory_format`` (default: the
    input's dtype, contiguous); see docs/ARCHITECTURE.md for the grouped form."""
    out = tensor if out_index is None else tensor.index_select(0, out_index)
    if in_index is not None:
        out = out.index_select(1, in_index) if in_index.dim() == 1 else _select_rows_per_group(out, in_index)
    if dtype is not None or memory_format is not None:  # a cast and a copy (the compiled kernel does it in one pass)
        converted = out.to(dtype=dtype or out.dtype, memory_format=memory_format or torch.contiguous_format)
        return converted if converted is not tensor else converted.clone()
    return out.contiguous() if out is not tensor else out.clone()


def scatter_channels(grad: Tensor, out_index: Optional[Tensor], in_index: Optional[Tensor],
                     full_shape: Sequence[int], dtype: Optional[torch.dtype] = None,
                     memory_format: Optional[torch.memory_format] = None) -> Tensor:
    """Inverse of :func:`gather_channels`: a zero tensor of ``full_shape`` (of ``dtype``, in ``memory_format``;
    default grad's dtype, contiguous) with ``grad`` at the selected places."""
    full = torch.zeros(full_shape, dtype=grad.dtype, device=grad.device)
    template = torch.arange(full.numel(), device=grad.device).reshape(full_shape)
    positions = gather_channels(template, out_index, in_index)
    full.view(-1)[positions.reshape(-1)] = grad.reshape(-1)
    if dtype is not None or memory_format is not None:
        full = full.to(dtype=dtype or full.dtype, memory_format=memory_format or torch.contiguous_format)
    return full


def update_running_stats_(running_mean: Tensor, running_var: Tensor, index: Tensor,
                          compact_mean: Tensor, compact_var: Tensor) -> None:
    """In place: ``running_mean[index] = compact_mean`` and ``running_var[index] = compact_var``."""
    running_mean.index_copy_(0, index, compact_mean.to(running_mean.dtype))
    running_var.index_copy_(0, index, compact_var.to(running_var.dtype))


def gather_channels_many(tensors: Sequence[Tensor], out_indices: Sequence[Optional[Tensor]],
                         in_indices: Sequence[Optional[Tensor]]) -> List[Tensor]:
    """:func:`gather_channels` of every ``(tensor, out_index, in_index)`` triple."""
    return [gather_channels(t, o, i) for t, o, i in zip(tensors, out_indices, in_indices)]


def scatter_channels_many(grads: Sequence[Tensor], out_indices: Sequence[Optional[Tensor]],
                          in_indices: Sequence[Optional[Tensor]], full_shapes: Sequence[Sequence[int]]) -> List[Tensor]:
    """:func:`scatter_channels` of every ``(grad, out_index, in_index, full_shape)``."""
    return [scatter_channels(g, o, i, s) for g, o, i, s in zip(grads, out_indices, in_indices, full_shapes)]
