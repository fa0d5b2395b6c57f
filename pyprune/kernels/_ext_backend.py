"""The compiled backend: ``torch.ops.pyprune.*`` from the ``pyprune._C`` extension.

Importing this module loads the extension (``ImportError`` when it is not built) and registers the fake kernels
of all three ops (csrc/bindings.cpp points the dispatcher here), so FakeTensor / meta tensors / ``torch.compile``
see their output shapes. Autograd is registered in C++ (csrc/autograd/channel_autograd.cpp: gather and scatter are each other's backward,
so double backward works): a Python autograd kernel would add microseconds to every call, grad or not.

The public functions are the ``OpOverload`` objects themselves: one C++ dispatcher call, no Python wrapper.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (loading the library runs its TORCH_LIBRARY registrations)

gather_channels = torch.ops.pyprune.channel_gather.default
scatter_channels = torch.ops.pyprune.channel_scatter.default
update_running_stats_ = torch.ops.pyprune.update_running_stats_.default


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


@torch.library.register_fake("pyprune::channel_gather")
def _channel_gather_fake(w: Tensor, out_idx: Optional[Tensor], in_idx: Optional[Tensor]) -> Tensor:
    return w.new_empty(_compact_shape(w.shape, out_idx, in_idx))


@torch.library.register_fake("pyprune::channel_scatter")
def _channel_scatter_fake(grad: Tensor, out_idx: Optional[Tensor], in_idx: Optional[Tensor],
                          full_shape: Sequence[int]) -> Tensor:
    compact = _compact_shape(full_shape, out_idx, in_idx)
    torch._check(list(grad.shape) == compact, lambda: f"grad has shape {list(grad.shape)}, expected {compact}")
    return grad.new_empty(list(full_shape))


@torch.library.register_fake("pyprune::update_running_stats_")
def _update_running_stats_fake(running_mean: Tensor, running_var: Tensor, idx: Tensor, mean: Tensor,
                               var: Tensor) -> None:
    return None
