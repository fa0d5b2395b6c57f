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


def gather_channels(tensor: Tensor, out_index: Optional[Tensor] = None, in_index: Optional[Tensor] = None) -> Tensor:
    """Return contiguous ``tensor[out_index][:, in_index]``; see docs/ARCHITECTURE.md for the grouped form."""
    out = tensor if out_index is None else tensor.index_select(0, out_index)
    if in_index is not None:
        out = out.index_select(1, in_index) if in_index.dim() == 1 else _select_rows_per_group(out, in_index)
    return out.contiguous() if out is not tensor else out.clone()


def scatter_channels(grad: Tensor, out_index: Optional[Tensor], in_index: Optional[Tensor],
                     full_shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`gather_channels`: a zero tensor of ``full_shape`` with ``grad`` at the selected places."""
    full = torch.zeros(full_shape, dtype=grad.dtype, device=grad.device)
    template = torch.arange(full.numel(), device=grad.device).reshape(full_shape)
    positions = gather_channels(template, out_index, in_index)
    full.view(-1)[positions.reshape(-1)] = grad.reshape(-1)
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
