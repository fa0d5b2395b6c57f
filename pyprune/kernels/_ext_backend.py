"""The compiled backend: ``torch.ops.pyprune.*`` from the ``pyprune._C`` extension.

Importing this module loads the extension (``ImportError`` when it is not built) and registers the fake kernels
of all its ops (csrc/bindings.cpp points the dispatcher here), so FakeTensor / meta tensors / ``torch.compile``
see their output shapes. Autograd is registered in C++ (csrc/autograd/: gather and scatter are each other's
backward, so double backward works): a Python autograd kernel would add microseconds to every call, grad or not.

The functions are the ``OpOverload`` objects themselves (one C++ dispatcher call, no Python wrapper), except
``scatter_channels_many``, which flattens ``full_shapes`` (the schema takes the shapes concatenated).
"""
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (loading the library runs its TORCH_LIBRARY registrations)

gather_channels = torch.ops.pyprune.channel_gather.default
scatter_channels = torch.ops.pyprune.channel_scatter.default
update_running_stats_ = torch.ops.pyprune.update_running_stats_.default
gather_channels_many = torch.ops.pyprune.channel_gather_many.default
_scatter_channels_many = torch.ops.pyprune.channel_scatter_many.default


def scatter_channels_many(grads: Sequence[Tensor], out_indices: Sequence[Optional[Tensor]],
                          in_indices: Sequence[Optional[Tensor]], full_shapes: Sequence[Sequence[int]]) -> List[Tensor]:
    return _scatter_channels_many(grads, out_indices, in_indices, [size for shape in full_shapes for size in shape])


def _check_index(index: Optional[Tensor], name: str, ranks: Sequence[int]) -> None:
    if index is not None:
        torch._check(index.dtype == torch.int64, lambda: f"{name} must be an int64 tensor, got {index.dtype}")
        torch._check(index.dim() in ranks, lambda: f"{name} must have {' or '.join(map(str, ranks))} dims")


def _compact_shape(full_shape: Sequence[int], out_idx: Optional[Tensor], in_idx: Optional[Tensor]) -> list:
    """Shape of ``full[out_idx][:, in_idx]``: [K_out, K_in, *rest] (a grouped in_idx is [G, K_in])."""
    _check_index(out_idx, "out_idx", (1,))
    _check_index(in_idx, "in_idx", (1, 2))
    shape = list(full_shape)
    if out_idx is not None:
        shape[0] = out_idx.shape[0]
    if in_idx is not None:
        torch._check(len(shape) >= 2, lambda: "in_idx needs a tensor of rank >= 2")
        shape[1] = in_idx.shape[-1]
    return shape


_CONVERTIBLE = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CHANNELS_LAST_RANK = {torch.channels_last: 4, torch.channels_last_3d: 5}


def _converted_empty(like: Tensor, shape: Sequence, dtype: Optional[torch.dtype],
                     memory_format: Optional[torch.memory_format]) -> Tensor:
    """The uninitialised output of a converting gather / scatter (checks as csrc/common/geometry.cpp's)."""
    dtype = like.dtype if dtype is None else dtype
    torch._check(dtype == like.dtype or (like.dtype in _CONVERTIBLE and dtype in _CONVERTIBLE),
                 lambda: f"dtype converts between float32, float64, float16 and bfloat16 only, got {like.dtype} to "
                         f"{dtype}")
    memory_format = torch.contiguous_format if memory_format is None else memory_format
    torch._check(memory_format == torch.contiguous_format or _CHANNELS_LAST_RANK.get(memory_format) == len(shape),
                 lambda: f"memory_format must be contiguous_format, channels_last (rank 4) or channels_last_3d "
                         f"(rank 5); got {memory_format} for a tensor of rank {len(shape)}")
    return like.new_empty(list(shape), dtype=dtype).contiguous(memory_format=memory_format)


@torch.library.register_fake("pyprune::channel_gather")
def _channel_gather_fake(w: Tensor, out_idx: Optional[Tensor], in_idx: Optional[Tensor],
                         dtype: Optional[torch.dtype] = None,
                         memory_format: Optional[torch.memory_format] = None) -> Tensor:
    shape = _compact_shape(w.shape, out_idx, in_idx)
    if dtype is None and memory_format is None:
        return w.new_empty(shape)
    return _converted_empty(w, shape, dtype, memory_format)


@torch.library.register_fake("pyprune::channel_scatter")
def _channel_scatter_fake(grad: Tensor, out_idx: Optional[Tensor], in_idx: Optional[Tensor],
                          full_shape: Sequence[int], dtype: Optional[torch.dtype] = None,
                          memory_format: Optional[torch.memory_format] = None) -> Tensor:
    compact = _compact_shape(full_shape, out_idx, in_idx)
    torch._check(list(grad.shape) == compact, lambda: f"grad has shape {list(grad.shape)}, expected {compact}")
    if dtype is None and memory_format is None:
        return grad.new_empty(list(full_shape))
    return _converted_empty(grad, full_shape, dtype, memory_format)


@torch.library.register_fake("pyprune::update_running_stats_")
def _update_running_stats_fake(running_mean: Tensor, running_var: Tensor, idx: Tensor, mean: Tensor,
                               var: Tensor) -> None:
    return None


def _check_list_lengths(tensors: Sequence[Tensor], out_idx: Sequence, in_idx: Sequence) -> None:
    torch._check(len(out_idx) == len(tensors) and len(in_idx) == len(tensors),
                 lambda: f"out_idx and in_idx need one entry per tensor ({len(tensors)}), got {len(out_idx)} and "
                         f"{len(in_idx)}")


@torch.library.register_fake("pyprune::channel_gather_many")
def _channel_gather_many_fake(tensors: Sequence[Tensor], out_idx: Sequence[Optional[Tensor]],
                              in_idx: Sequence[Optional[Tensor]]) -> List[Tensor]:
    _check_list_lengths(tensors, out_idx, in_idx)
    return [_channel_gather_fake(w, o, i) for w, o, i in zip(tensors, out_idx, in_idx)]


@torch.library.register_fake("pyprune::channel_scatter_many")
def _channel_scatter_many_fake(grads: Sequence[Tensor], out_idx: Sequence[Optional[Tensor]],
                               in_idx: Sequence[Optional[Tensor]], full_shapes: Sequence[int]) -> List[Tensor]:
    _check_list_lengths(grads, out_idx, in_idx)
    ranks = [grad.dim() for grad in grads]
    torch._check(len(full_shapes) == sum(ranks),
                 lambda: f"full_shapes must concatenate the full shape of every gradient ({sum(ranks)} sizes), "
                         f"got {len(full_shapes)}")
    results, start = [], 0
    for grad, o, i, rank in zip(grads, out_idx, in_idx, ranks):
        results.append(_channel_scatter_fake(grad, o, i, full_shapes[start:start + rank]))
        start += rank
    return results
