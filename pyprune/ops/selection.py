"""Turning a user's channel choice (ratio, count, mask, indices) into a validated global channel index.

This is the public, validated path: it may synchronise with the device (``.item()``, ``.tolist()``) to check
values. DynamicOps call it from ``set_out_channels`` / ``set_in_channels`` before touching any state, so a bad
choice raises :class:`~pyprune.errors.ChannelSelectionError` and leaves the layer exactly as it was.
"""
import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..channels import ratio_to_count
from ..errors import ChannelSelectionError

__all__ = ["choice_to_index", "check_index", "prefix_index"]


def prefix_index(count: int, num_channels: int, groups: int, device: Optional[torch.device]) -> Optional[Tensor]:
    """The first ``count`` channels, or with ``groups > 1`` the first ``count // groups`` of each of the ``groups``
    equal blocks (``count`` must be a multiple of ``groups``). ``None`` when every channel is kept."""
    if count == num_channels:
        return None
    if groups == 1:
        return torch.arange(count, device=device)
    per_block, block_size = count // groups, num_channels // groups
    starts = torch.arange(groups, device=device).unsqueeze(1) * block_size
    return (starts + torch.arange(per_block, device=device)).reshape(-1)


def choice_to_index(choice, num_channels: int, groups: int, device: Optional[torch.device],
                    where: str) -> Optional[Tensor]:
    """A validated, sorted, unique int64 index ``[K]`` on ``device`` for ``choice``; ``None`` = all channels.

    choice: a ratio ``float`` in (0, 1] (the first ``ratio_to_count(ratio, num_channels)`` channels), an ``int``
    count in ``[1, num_channels]``, a bool mask ``[num_channels]`` (tensor or list), or indices (int64 tensor or a
    list of ints, any order). ``groups > 1``: the selection must keep the same count in each of ``groups`` equal
    blocks of channels; a ratio / count then keeps the first ``count // groups`` channels of every block.
    ``device``: where the index must live (``None``: the layer holds no tensors, any device will do).
    ``where``: prefix of error messages (names the layer and the side).
    """
    if isinstance(choice, bool):
        raise _error(where, f"{choice!r} is not a channel choice (use a ratio float, a count int, a bool mask or "
                            f"indices)")
    if isinstance(choice, numbers.Integral):
        return _count_to_index(int(choice), num_channels, groups, device, where)
    if isinstance(choice, numbers.Real):
        return _ratio_to_index(float(choice), num_channels, groups, device, where)
    if isinstance(choice, (list, tuple)):
        choice = _sequence_to_tensor(choice, device, where)
    if not isinstance(choice, Tensor):
        raise _error(where, f"unsupported channel choice of type {type(choice).__name__}; expected a ratio float, a "
                            f"count int, a bool mask or a list / int64 tensor of indices")
    if device is not None and choice.device != device:
        raise _error(where, f"the choice tensor is on {choice.device} but the layer is on {device}")
    if choice.dtype == torch.bool:
        return _mask_to_index(choice, num_channels, groups, where)
    return check_index(choice, num_channels, groups, where)


def check_index(index: Tensor, num_channels: int, groups: int, where: str) -> Optional[Tensor]:
    """Validate an index tensor (int64, 1-D, non-empty, in range, unique, balanced over ``groups``); returns it
    sorted, or ``None`` when it keeps every channel."""
    if index.dtype != torch.int64:
        raise _error(where, f"channel indices must be an int64 tensor, got dtype {index.dtype}")
    if index.dim() != 1:
        raise _error(where, f"channel indices must be 1-D, got shape {tuple(index.shape)}")
    if index.numel() == 0:
        raise _error(where, "the selection is empty; at least one channel must be kept")
    low, high = int(index.min().item()), int(index.max().item())
    if low < 0 or high >= num_channels:
        bad = low if low < 0 else high
        raise _error(where, f"channel index {bad} is out of range for {num_channels} channels")
    index = torch.sort(index).values
    repeated = index[1:][index[1:] == index[:-1]]
    if repeated.numel():
        raise _error(where, f"channel index {int(repeated[0].item())} is given more than once")
    _check_balanced(index, num_channels, groups, where)
    return None if index.numel() == num_channels else index


def _count_to_index(count: int, num_channels: int, groups: int, device, where: str) -> Optional[Tensor]:
    if not 1 <= count <= num_channels:
        raise _error(where, f"channel count {count} is out of range [1, {num_channels}]")
    if count % groups:
        raise _error(where, f"channel count {count} cannot be split evenly over the layer's {groups} groups")
    return prefix_index(count, num_channels, groups, device)


def _ratio_to_index(ratio: float, num_channels: int, groups: int, device, where: str) -> Optional[Tensor]:
    if not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
        raise _error(where, f"channel ratio {ratio!r} is not in (0, 1]")
    count = ratio_to_count(ratio, num_channels)  # the one rule every ratio entry point uses (pyprune.channels)
    if count % groups:
        raise _error(where, f"channel ratio {ratio!r} keeps {count} channels, which cannot be split evenly over "
                            f"the layer's {groups} groups")
    return prefix_index(count, num_channels, groups, device)


def _sequence_to_tensor(values: Sequence, device, where: str) -> Tensor:
    if values and all(isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.bool, device=device)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise _error(where, "a list choice must hold only int channel indices or only bools (a mask)")
    return torch.tensor(list(values), dtype=torch.int64, device=device)


def _mask_to_index(mask: Tensor, num_channels: int, groups: int, where: str) -> Optional[Tensor]:
    if mask.dim() != 1 or mask.shape[0] != num_channels:
        raise _error(where, f"a channel mask must have shape [{num_channels}], got {list(mask.shape)}")
    count = int(mask.sum().item())
    if count == 0:
        raise _error(where, "the mask keeps no channel; at least one must be kept")
    index = torch.nonzero(mask).reshape(-1)  # sorted and unique by construction
    _check_balanced(index, num_channels, groups, where)
    return None if count == num_channels else index


def _check_balanced(index: Tensor, num_channels: int, groups: int, where: str) -> None:
    if groups == 1:
        return
    counts = torch.bincount(index // (num_channels // groups), minlength=groups).tolist()
    if len(set(counts)) != 1:
        raise _error(where, f"the layer has {groups} channel groups and a selection must keep the same number of "
                            f"channels in each; it keeps {counts}")


def _error(where: str, what: str) -> ChannelSelectionError:
    return ChannelSelectionError(f"{where}: {what}")
