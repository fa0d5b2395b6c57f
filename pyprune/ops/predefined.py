"""The predefined dynamic layers one-shot supernets are built from (mmrazor's ``BigNasConv2d``, ``OFAConv2d``,
``DynamicSequential``, ``DynamicPatchEmbed``), on pyprune's DynamicOps.

* :class:`BigNasConv2d`: a :class:`~pyprune.ops.DynamicConv2d` that also takes a kernel-size mutable
  (``register_mutable_attr('kernel_size', OneShotMutableValue([3, 5, 7]))``): a smaller kernel is the centre crop
  of the full one, padded ``k // 2`` ("same" padding, as mmrazor pads whenever a kernel mutable is registered).
* :class:`OFAConv2d`: as BigNasConv2d, but each smaller kernel is the centre crop of the next larger one mapped by
  a learnt ``k^2 x k^2`` matrix (``trans_matrix_{K}to{k}``, identity at first; Once-for-All's kernel transform).
* :class:`DynamicConv2dAdaptivePadding`: a :class:`~pyprune.ops.DynamicConv2d` with mmcv's input-size "same"
  padding (:class:`~pyprune.utils.adaptive_padding_conv.Conv2dAdaptivePadding`, which its export gives).
* :class:`DynamicSequential`: an ``nn.Sequential`` whose ``depth`` mutable runs only its first blocks.
* :class:`DynamicPatchEmbed`: :class:`~pyprune.utils.patch_embed.PatchEmbed` with an ``embed_dims`` mutable; its
  projection and norm are DynamicOps driven by that channel.
* :class:`DynamicRelativePosition2D`: :class:`~pyprune.utils.relative_position.RelativePosition2D` (AutoFormer's
  iRPE) with a ``head_dims`` mutable channel: the tables' kept columns.

The convolutions are DynamicOps (units, compact training, budgets, export work as for ``DynamicConv2d``; their cost
terms count the current kernel). The two containers are :class:`DynamicContainer`: ``export()`` /
``to_static_op()`` gives the plain module, and a mutator's ``export`` replaces them too. Each layer's ``export()``
computes what its forward computes (tests compare them).
"""
import math
from collections import OrderedDict
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.adaptive_padding_conv import Conv2dAdaptivePadding, adaptive_pad
from ..utils.patch_embed import PatchEmbed
from ..utils.relative_position import RelativePosition2D
from ..errors import ConfigError
from .conv import DynamicConv2d
from .cost_terms import Bilinear, CostTerms, ParameterCount
from .layernorm import DynamicLayerNorm

__all__ = ["BigNasConv2d", "OFAConv2d", "DynamicConv2dAdaptivePadding", "DynamicSequential", "DynamicPatchEmbed",
           "DynamicRelativePosition2D", "DynamicContainer"]


def _value_choices(mutable) -> List:
    """The choices of a mutable value (``choices``, mmrazor's attribute), or [] when it has none."""
    return list(getattr(mutable, "choices", None) or [])


def _center(source: int, target: int) -> slice:
    """The centre ``target`` positions of ``source`` (both odd)."""
    start = source // 2 - target // 2
    return slice(start, start + target)


class BigNasConv2d(DynamicConv2d):
    """``nn.Conv2d`` over the active channels and the current kernel size: x ``[N, K_in, H, W]`` -> ``[N, K_out,
    H', W']`` with weight ``[K_out, K_in / groups, k, k]``, the centre crop of the full ``[.., K, K]`` kernel."""

    _value_attrs = ("kernel_size",)

    @property
    def mutable_kernel_size(self):
        """The registered kernel-size mutable, or None."""
        return self.get_mutable_attr("kernel_size")

    @property
    def kernel_size_list(self) -> Optional[List[int]]:
        """The kernel sizes the mutable can choose, sorted (None without one)."""
        return self.__dict__.get("_kernel_size_list")

    def _register_value_attr(self, attr: str, mutable) -> None:
        choices = _value_choices(mutable)
        where = self._mutable_where()
        if not choices or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 and k % 2 == 1
                                  for k in choices):
            raise ConfigError(f"{where}: a kernel_size mutable needs choices of odd positive ints, got {mutable!r}")
        if self.kernel_size[0] != self.kernel_size[1] or max(choices) != self.kernel_size[0]:
            raise ConfigError(f"{where}: the largest kernel_size choice must be the layer's square kernel "
                              f"{tuple(self.kernel_size)}, got choices {sorted(choices)}")
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ConfigError(f"{where}: a kernel_size mutable needs padding_mode='zeros' and int padding (the "
                              f"padding follows the kernel), got {self.padding_mode!r} / {self.padding!r}")
        self.__dict__["_kernel_size_list"] = sorted(set(choices))

    @property
    def current_kernel_size(self) -> int:
        """The kernel size the layer runs with (the mutable's choice, else the full kernel)."""
        mutable = self.mutable_kernel_size
        if mutable is None:
            return self.kernel_size[0]
        choice = mutable.current_choice
        if choice not in self.kernel_size_list:
            raise ConfigError(f"{self._mutable_where()}: kernel_size choice {choice!r} is not one of "
                              f"{self.kernel_size_list}")
        return choice

    def _current_padding(self) -> Tuple[int, ...]:
        if self.mutable_kernel_size is None:
            return self.padding
        return (self.current_kernel_size // 2,) * 2

    def _kernel_weight(self, weight: Tensor) -> Tensor:
        """``weight`` ``[O, I, K, K]`` at the current kernel ``[O, I, k, k]``: the centre crop."""
        k = self.current_kernel_size
        if k == weight.shape[-1]:
            return weight
        window = _center(weight.shape[-1], k)
        return weight[:, :, window, window]

    def forward(self, x: Tensor) -> Tensor:
        if self.mutable_kernel_size is None:
            return super().forward(x)
        self._check_input(x)
        weight, bias = self.active_tensors(x)
        return self._conv(x, self._kernel_weight(weight), bias, self.stride, self._current_padding(), self.dilation,
                          self.active_groups)

    def export(self) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` at the active channels and the current kernel (and its padding)."""
        if self.mutable_kernel_size is None:
            return super().export()
        with torch.no_grad():
            weight, bias = self.tensor_provider.tensors_to_export(self)
            weight = self._kernel_weight(weight).detach().clone()
            static = nn.Conv2d(self.active_in_channels, self.active_out_channels, weight.shape[-1], self.stride,
                               self._current_padding(), self.dilation, self.active_groups, bias is not None,
                               device="meta")
            static.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
            if bias is not None:
                static.bias = nn.Parameter(bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return static.train(self.training)

    @classmethod
    def cost_terms(cls, module: nn.Module, calls) -> CostTerms:
        """As :meth:`DynamicConv2d.cost_terms`, with the weight's FLOPs and elements at the current kernel."""
        terms = super().cost_terms(module, calls)
        share = module.current_kernel_size ** 2 / math.prod(module.kernel_size)
        if share == 1.0:
            return terms
        params = tuple(ParameterCount(p.parameter, Bilinear(*(v * share for v in p.count)))
                       if p.parameter is module.weight else p for p in terms.params)
        return CostTerms(Bilinear(*(v * share for v in terms.flops)), params)


class OFAConv2d(BigNasConv2d):
    """As :class:`BigNasConv2d`; a kernel smaller than ``K`` is made step by step through the choices: the centre
    of the current ``[.., s, s]`` kernel, flattened to ``[O * I, t * t]``, times ``trans_matrix_{s}to{t}`` (``[t*t,
    t*t]``, as ``F.linear`` applies it), down to the current size."""

    def _register_value_attr(self, attr: str, mutable) -> None:
        super()._register_value_attr(attr, mutable)
        sizes = self.kernel_size_list
        names = []
        for source, target in zip(sizes[:0:-1], sizes[-2::-1]):
            name = f"trans_matrix_{source}to{target}"
            if name not in self._parameters:  # a second registration keeps what was learnt
                self.register_parameter(name, nn.Parameter(torch.eye(target * target, device=self.weight.device,
                                                                     dtype=self.weight.dtype)))
            names.append(name)
        self.__dict__["_trans_matrix_names"] = names

    def _kernel_weight(self, weight: Tensor) -> Tensor:
        k = self.current_kernel_size
        sizes = self.kernel_size_list
        for source, target in zip(sizes[:0:-1], sizes[-2::-1]):
            if source <= k:
                break
            window = _center(source, target)
            part = weight[:, :, window, window].reshape(-1, target * target)
            part = F.linear(part, getattr(self, f"trans_matrix_{source}to{target}"))
            weight = part.reshape(weight.shape[0], weight.shape[1], target, target)
        return weight


class DynamicConv2dAdaptivePadding(DynamicConv2d):
    """:class:`~pyprune.utils.adaptive_padding_conv.Conv2dAdaptivePadding` over the active channels: x ``[N, K_in,
    H, W]`` padded for a ``ceil(H / stride)`` x ``ceil(W / stride)`` output, then convolved unpadded."""

    _torch_type = Conv2dAdaptivePadding

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(adaptive_pad(x, self.kernel_size, self.stride, self.dilation))


class DynamicContainer:
    """Mixin of the dynamic layers that are not DynamicOps (they hold DynamicOps, or read their mutables in their own
    forward): ``export()`` gives the plain module, and a mutator's export replaces them before the DynamicOps."""

    def export(self) -> nn.Module:
        raise NotImplementedError

    def to_static_op(self) -> nn.Module:
        """Alias of :meth:`export` (mmrazor's name)."""
        return self.export()

    def register_mutable_attr(self, attr: str, mutable) -> None:
        raise NotImplementedError

    def get_mutable_attr(self, attr: str):
        return self.__dict__.get("_mutable_attrs", {}).get(attr)

    @property
    def mutable_attrs(self):
        return dict(self.__dict__.get("_mutable_attrs", {}))

    def _store_mutable(self, attr: str, mutable) -> None:
        self.__dict__.setdefault("_mutable_attrs", {})[attr] = mutable


class DynamicSequential(DynamicContainer, nn.Sequential):
    """``nn.Sequential`` that runs its first ``depth`` modules (``register_mutable_attr('depth', mutable)``, a
    mutable value of ints in ``[1, len(self)]``); without one, all of them. ``init_cfg`` is accepted (mmengine's
    ``Sequential``) and not used."""

    def __init__(self, *args, init_cfg: Optional[dict] = None):
        super().__init__(*args)

    @classmethod
    def convert_from(cls, module: nn.Sequential) -> "DynamicSequential":
        """A DynamicSequential holding ``module``'s modules (the same objects, under the same names)."""
        return cls(module._modules)

    @property
    def mutable_depth(self):
        """The registered depth mutable, or None."""
        return self.get_mutable_attr("depth")

    def register_mutable_attr(self, attr: str, mutable) -> None:
        where = f"DynamicSequential ({len(self)} modules)"
        if attr != "depth":
            raise ConfigError(f"{where}: register_mutable_attr supports 'depth'; got {attr!r}")
        depths = _value_choices(mutable) or [getattr(mutable, "current_choice", None)]
        if not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= self.pure_module_nums
                   for d in depths):
            raise ConfigError(f"{where}: a depth mutable's choices must be ints in [1, {self.pure_module_nums}], got "
                              f"{mutable!r}")
        self._store_mutable("depth", mutable)

    @property
    def current_depth(self) -> int:
        mutable = self.mutable_depth
        return self.pure_module_nums if mutable is None else mutable.current_choice

    @property
    def pure_module_nums(self) -> int:
        """Number of modules the forward runs at full depth."""
        return len(self._modules)

    def pure_modules(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def forward(self, x):
        for module in list(self.pure_modules())[:self.current_depth]:
            x = module(x)
        return x

    def export(self) -> nn.Sequential:
        """A plain ``nn.Sequential`` of the first ``depth`` modules (the same module objects, names kept)."""
        kept = list(self._modules.items())[:self.current_depth]
        return nn.Sequential(OrderedDict(kept)).train(self.training)


class DynamicPatchEmbed(DynamicContainer, PatchEmbed):
    """:class:`~pyprune.utils.patch_embed.PatchEmbed` whose ``embed_dims`` follow a mutable channel: x ``[N, C, H,
    W]`` -> ``[N, H' * W', K]`` with ``K`` the active embedding channels. ``register_mutable_attr('embed_dims' |
    'in_channels' | 'out_channels', mutable)`` registers it on the projection's output and the norm (a second
    registration is refused); the projection is a :class:`DynamicConv2d`, the norm a :class:`DynamicLayerNorm`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._make_dynamic()

    def _make_dynamic(self) -> None:
        self.projection = DynamicConv2d.convert_from(self.projection)
        if self.norm is not None:
            self.norm = DynamicLayerNorm.convert_from(self.norm)

    @classmethod
    def convert_from(cls, module: PatchEmbed) -> "DynamicPatchEmbed":
        """A DynamicPatchEmbed sharing ``module``'s parameters."""
        if not isinstance(module, PatchEmbed):
            raise ConfigError(f"DynamicPatchEmbed.convert_from: expected a PatchEmbed, got {type(module).__name__}")
        dynamic = cls.__new__(cls)
        nn.Module.__init__(dynamic)
        for key in ("img_size", "embed_dims", "patches_resolution", "num_patches"):
            setattr(dynamic, key, getattr(module, key))
        dynamic.projection, dynamic.norm = module.projection, module.norm
        dynamic._make_dynamic()
        return dynamic

    @property
    def mutable_embed_dims(self):
        return self.get_mutable_attr("embed_dims")

    def register_mutable_attr(self, attr: str, mutable) -> None:
        where = f"DynamicPatchEmbed ({self.embed_dims} embed_dims)"
        if attr not in ("embed_dims", "in_channels", "out_channels"):
            raise ConfigError(f"{where}: register_mutable_attr supports 'embed_dims' ('in_channels' / "
                              f"'out_channels' name it too); got {attr!r}")
        if self.mutable_embed_dims is not None:
            raise ConfigError(f"{where}: embed_dims has a mutable already ({self.mutable_embed_dims!r})")
        self.projection.register_mutable_attr("out_channels", mutable)  # checks the width
        if self.norm is not None:
            self.norm.register_mutable_attr("num_features", mutable)
        self._store_mutable("embed_dims", mutable)

    def export(self) -> PatchEmbed:
        """The plain PatchEmbed at the active embedding channels."""
        norm = None if self.norm is None else self.norm.export()
        return PatchEmbed.from_parts(self.img_size, self.projection.export(), norm).train(self.training)


class DynamicRelativePosition2D(DynamicContainer, RelativePosition2D):
    """:class:`~pyprune.utils.relative_position.RelativePosition2D` over the kept head dims: ``forward(length_q,
    length_k)`` -> ``[length_q, length_k, K]``, the tables' columns the ``head_dims`` mutable channel keeps
    (``register_mutable_attr('head_dims' | 'in_channels' | 'out_channels', mutable)``; mmrazor takes the first
    ``activated_channels`` columns, the same for the sequential channels it uses)."""

    @classmethod
    def convert_from(cls, module: RelativePosition2D) -> "DynamicRelativePosition2D":
        """A DynamicRelativePosition2D sharing ``module``'s tables."""
        if not isinstance(module, RelativePosition2D):
            raise ConfigError(f"DynamicRelativePosition2D.convert_from: expected a RelativePosition2D, got "
                              f"{type(module).__name__}")
        dynamic = cls.__new__(cls)
        nn.Module.__init__(dynamic)
        dynamic.head_dims, dynamic.max_relative_position = module.head_dims, module.max_relative_position
        dynamic.embeddings_table_v, dynamic.embeddings_table_h = module.embeddings_table_v, module.embeddings_table_h
        return dynamic

    @property
    def mutable_head_dims(self):
        return self.get_mutable_attr("head_dims")

    def register_mutable_attr(self, attr: str, mutable) -> None:
        where = f"DynamicRelativePosition2D ({self.head_dims} head_dims)"
        if attr not in ("head_dims", "in_channels", "out_channels"):
            raise ConfigError(f"{where}: register_mutable_attr supports 'head_dims' ('in_channels' / "
                              f"'out_channels' name it too); got {attr!r}")
        if self.mutable_head_dims is not None:
            raise ConfigError(f"{where}: head_dims has a mutable already ({self.mutable_head_dims!r})")
        if getattr(mutable, "num_channels", None) != self.head_dims or not hasattr(mutable, "current_mask"):
            raise ConfigError(f"{where}: a head_dims mutable must be a mutable channel of {self.head_dims} channels, "
                              f"got {mutable!r}")
        self._store_mutable("head_dims", mutable)

    def _kept(self) -> Optional[Tensor]:
        """Int64 ``[K]`` of the kept head dims (None: all)."""
        mutable = self.mutable_head_dims
        if mutable is None:
            return None
        mask = mutable.current_mask.to(device=self.embeddings_table_v.device, dtype=torch.bool)
        if not bool(mask.any()):
            raise ConfigError(f"DynamicRelativePosition2D ({self.head_dims} head_dims): the head_dims mutable keeps "
                              f"no channel")
        return mask.nonzero().flatten()

    def forward(self, length_q: int, length_k: int) -> Tensor:
        kept = self._kept()
        if kept is None:
            return super().forward(length_q, length_k)
        return self._embed(length_q, length_k, self.embeddings_table_v[:, kept], self.embeddings_table_h[:, kept])

    def export(self) -> RelativePosition2D:
        """The plain RelativePosition2D of the kept head dims (copies of the tables' kept columns)."""
        kept = self._kept()
        with torch.no_grad():
            table_v, table_h = self.embeddings_table_v, self.embeddings_table_h
            if kept is not None:
                table_v, table_h = table_v[:, kept], table_h[:, kept]
            with torch.device("meta"):
                static = RelativePosition2D(table_v.shape[1], self.max_relative_position)
            static.embeddings_table_v = nn.Parameter(table_v.detach().clone(),
                                                     requires_grad=self.embeddings_table_v.requires_grad)
            static.embeddings_table_h = nn.Parameter(table_h.detach().clone(),
                                                     requires_grad=self.embeddings_table_h.requires_grad)
        return static.train(self.training)
