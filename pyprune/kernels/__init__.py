"""Channel gather / scatter kernels behind one small API, on one of two backends.

* ``"ext"``: the compiled ops ``torch.ops.pyprune.*`` (csrc/, C++ and CUDA; see ``_ext_backend``);
* ``"torch"``: a pure-torch fallback with the same semantics (``_torch_backend``).

At import the extension is used when it loads; otherwise we warn once and fall back to "torch". The environment
variable ``PYPRUNE_BACKEND=ext|torch`` forces one (``ext`` without a built extension raises ``ImportError``).
This package is the only Python that touches ``pyprune._C``. Shapes: see docs/ARCHITECTURE.md.
"""
import contextlib
import os
import warnings
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from . import _torch_backend

__all__ = ["gather_channels", "scatter_channels", "gather_channels_many", "scatter_channels_many",
           "update_running_stats_", "backend", "set_backend", "use_backend", "extension_available", "BACKENDS"]

BACKENDS = ("ext", "torch")
_ENV_VAR = "PYPRUNE_BACKEND"
_BUILD_HINT = ("build it from the repository root with `pip install --no-build-isolation -e .` "
               "(or `bash scripts/setup.sh`)")

_extension = None            # the loaded _ext_backend module, once imported
_extension_error: Optional[BaseException] = None
_extension_tried = False
_active = _torch_backend     # module whose functions the public API forwards to
_active_name = "torch"


def _load_extension():
    """Import the compiled backend once; ``None`` (and the reason in ``_extension_error``) when it is missing."""
    global _extension, _extension_error, _extension_tried
    if not _extension_tried:
        _extension_tried = True
        try:
            from . import _ext_backend
            _extension = _ext_backend
        except ImportError as error:  # not built, or built against another torch
            _extension_error = error
    return _extension


def extension_available() -> bool:
    """Whether the compiled extension ``pyprune._C`` imports in this process."""
    return _load_extension() is not None


def backend() -> str:
    """Name of the active backend: ``"ext"`` or ``"torch"``."""
    return _active_name


def set_backend(name: str) -> None:
    """Switch every later kernel call to backend ``name`` (``"ext"`` or ``"torch"``)."""
    global _active, _active_name
    if name == "torch":
        module = _torch_backend
    elif name == "ext":
        module = _load_extension()
        if module is None:
            raise RuntimeError(f"pyprune kernel backend 'ext' requested, but the compiled extension pyprune._C "
                               f"could not be imported ({_extension_error}); {_BUILD_HINT}")
    else:
        raise ValueError(f"unknown pyprune kernel backend {name!r}; expected one of {BACKENDS}")
    _active, _active_name = module, name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: run the block on backend ``name``, then restore the previous one."""
    previous = _active_name
    set_backend(name)
    try:
        yield name
    finally:
        set_backend(previous)


def gather_channels(tensor: Tensor, out_index: Optional[Tensor] = None, in_index: Optional[Tensor] = None,
                    dtype: Optional[torch.dtype] = None, memory_format: Optional[torch.memory_format] = None) -> Tensor:
    """New contiguous ``tensor[out_index][:, in_index]``, differentiable w.r.t. ``tensor``.

    tensor: ``[C_out, C_in, *rest]`` (rank >= 1). out_index: int64 ``[K_out]`` or None (all). in_index: int64
    ``[K_in]``, or ``[G, K_in]`` per-group local indices (compact row r uses ``in_index[r // (K_out // G)]``), or
    None. Returns ``[K_out, K_in, *rest]`` (``[K_out]`` for 1-D). Index values are trusted (not range-checked on GPU).

    ``dtype`` (float32 / float64 / float16 / bfloat16 from one of those) and ``memory_format`` (``channels_last`` for
    rank 4, ``channels_last_3d`` for rank 5) write the result in that form in the same pass, e.g. the bf16
    channels_last compact weight of a conv under autocast; the gradient still comes back in ``tensor``'s dtype (and
    channels_last layout, when ``tensor`` has it). None: ``tensor``'s dtype, contiguous.
    """
    if dtype is None and memory_format is None:
        return _active.gather_channels(tensor, out_index, in_index)  # the hot path: no keyword handling
    return _active.gather_channels(tensor, out_index, in_index, dtype=dtype, memory_format=memory_format)


def scatter_channels(grad: Tensor, out_index: Optional[Tensor], in_index: Optional[Tensor],
                     full_shape: Sequence[int], dtype: Optional[torch.dtype] = None,
                     memory_format: Optional[torch.memory_format] = None) -> Tensor:
    """Inverse of :func:`gather_channels`: zeros of ``full_shape`` with ``grad`` ``[K_out, K_in, *rest]`` at the
    selected places (one pass, no accumulation, no host sync), of ``dtype`` in ``memory_format`` (default: grad's
    dtype, contiguous)."""
    if dtype is None and memory_format is None:
        return _active.scatter_channels(grad, out_index, in_index, full_shape)
    return _active.scatter_channels(grad, out_index, in_index, full_shape, dtype=dtype, memory_format=memory_format)


def gather_channels_many(tensors: Sequence[Tensor], out_indices: Optional[Sequence[Optional[Tensor]]] = None,
                         in_indices: Optional[Sequence[Optional[Tensor]]] = None) -> List[Tensor]:
    """:func:`gather_channels` of a whole list in one call: ``result[n] = gather_channels(tensors[n],
    out_indices[n], in_indices[n])``, for a model's compact weights in one step (one kernel launch on CUDA, one
    dispatcher call and one autograd node for all; the gradient of output ``n`` goes to ``tensors[n]``).

    tensors: any shapes / dtypes of rank >= 1, all on one device. out_indices / in_indices: one entry per tensor (an
    index as for :func:`gather_channels`, grouped ``[G, K_in]`` included, or None), or None for "None everywhere".
    """
    tensors, out_indices, in_indices = _list_arguments("gather_channels_many", "tensors", tensors, out_indices,
                                                       in_indices)
    return _active.gather_channels_many(tensors, out_indices, in_indices) if tensors else []


def scatter_channels_many(grads: Sequence[Tensor], out_indices: Optional[Sequence[Optional[Tensor]]],
                          in_indices: Optional[Sequence[Optional[Tensor]]],
                          full_shapes: Sequence[Sequence[int]]) -> List[Tensor]:
    """Inverse of :func:`gather_channels_many`: ``result[n] = scatter_channels(grads[n], out_indices[n],
    in_indices[n], full_shapes[n])``."""
    grads, out_indices, in_indices = _list_arguments("scatter_channels_many", "grads", grads, out_indices, in_indices)
    if len(full_shapes) != len(grads):
        raise ValueError(f"scatter_channels_many: full_shapes needs one shape per gradient ({len(grads)}), "
                         f"got {len(full_shapes)}")
    return _active.scatter_channels_many(grads, out_indices, in_indices, full_shapes) if grads else []


def _list_arguments(op: str, name: str, tensors: Sequence[Tensor], out_indices, in_indices):
    """Lists of equal length (None -> no index for any tensor); a length mismatch is a ValueError naming both."""
    tensors = list(tensors)
    out_indices = [None] * len(tensors) if out_indices is None else list(out_indices)
    in_indices = [None] * len(tensors) if in_indices is None else list(in_indices)
    if len(out_indices) != len(tensors) or len(in_indices) != len(tensors):
        raise ValueError(f"{op}: out_indices and in_indices need one entry (an index or None) per tensor of {name} "
                         f"({len(tensors)}), got {len(out_indices)} and {len(in_indices)}")
    return tensors, out_indices, in_indices


def update_running_stats_(running_mean: Tensor, running_var: Tensor, index: Tensor, compact_mean: Tensor,
                          compact_var: Tensor) -> None:
    """In place: ``running_mean[index] = compact_mean``; ``running_var[index] = compact_var`` (all 1-D, ``index``
    int64 ``[K]``); other entries are untouched."""
    _active.update_running_stats_(running_mean, running_var, index, compact_mean, compact_var)


def _select_initial_backend() -> None:
    requested = os.environ.get(_ENV_VAR, "").strip().lower()
    if requested not in ("", "auto") + BACKENDS:
        raise ValueError(f"{_ENV_VAR}={requested!r}: expected one of {BACKENDS} (or unset)")
    if requested == "torch":
        set_backend("torch")  # the extension is only loaded if someone asks for it later
    elif _load_extension() is not None:
        set_backend("ext")
    elif requested == "ext":
        raise ImportError(f"{_ENV_VAR}=ext but the compiled extension pyprune._C could not be imported "
                          f"({_extension_error}); {_BUILD_HINT}")
    else:
        warnings.warn(f"pyprune: the compiled channel kernels (pyprune._C) are not available ({_extension_error}); "
                      f"using the slower pure-torch fallback. To use them, {_BUILD_HINT}. Set {_ENV_VAR}=torch "
                      f"to choose the fallback explicitly and silence this warning.", UserWarning, stacklevel=2)


_select_initial_backend()
