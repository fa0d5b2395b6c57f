"""PatchEmbed: mmcls's patch embedding, a plain layer (mmrazor's ``DynamicPatchEmbed`` is its dynamic form).

``PatchEmbed(img_size=224, in_channels=3, embed_dims=768, norm_cfg=None, conv_cfg=None)``: a convolution with
kernel = stride = 16 (``conv_cfg`` may set ``kernel_size`` / ``stride`` / ``padding`` / ``dilation``), then the
patches as tokens, then an optional norm (``norm_cfg=dict(type='LN', eps=1e-6)``). Input ``[N, in_channels, H, W]``
-> ``[N, H' * W', embed_dims]``. It is a plain module: the one ``DynamicPatchEmbed.export()`` returns.
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["PatchEmbed"]

_CONV_KEYS = ("type", "kernel_size", "stride", "padding", "dilation")


def _pair(value) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class PatchEmbed(nn.Module):
    """Image ``[N, C, H, W]`` -> patch tokens ``[N, H' * W', embed_dims]`` (mmcls's ``PatchEmbed``)."""

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, in_channels: int = 3, embed_dims: int = 768,
                 norm_cfg: Optional[dict] = None, conv_cfg: Optional[dict] = None, init_cfg=None):
        super().__init__()
        conv = dict(type="Conv2d", kernel_size=16, stride=16, padding=0, dilation=1)
        conv.update(conv_cfg or {})
        unknown = sorted(set(conv) - set(_CONV_KEYS))
        if conv["type"] != "Conv2d" or unknown:
            raise ConfigError(f"PatchEmbed: conv_cfg takes type='Conv2d' and {list(_CONV_KEYS[1:])}; got "
                              f"{dict(conv_cfg)}")
        self.img_size = _pair(img_size)
        self.embed_dims = embed_dims
        self.projection = nn.Conv2d(in_channels, embed_dims, conv["kernel_size"], conv["stride"], conv["padding"],
                                    conv["dilation"])
        h, w = (((size + 2 * p - d * (k - 1) - 1) // s + 1) for size, p, d, k, s in zip(
            self.img_size, _pair(conv["padding"]), _pair(conv["dilation"]), _pair(conv["kernel_size"]),
            _pair(conv["stride"])))
        self.patches_resolution = (h, w)
        self.num_patches = h * w
        self.norm = None
        if norm_cfg is not None:
            norm_type = norm_cfg.get("type")
            if norm_type not in ("LN", "LayerNorm"):
                raise ConfigError(f"PatchEmbed: norm_cfg type must be 'LN', got {norm_type!r}")
            self.norm = nn.LayerNorm(embed_dims, eps=norm_cfg.get("eps", 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        x = self.projection(x).flatten(2).transpose(1, 2)
        return x if self.norm is None else self.norm(x)

    @classmethod
    def from_parts(cls, img_size, projection: nn.Conv2d, norm: Optional[nn.Module]) -> "PatchEmbed":
        """A PatchEmbed holding ``projection`` and ``norm`` themselves (built on the meta device, then filled)."""
        with torch.device("meta"):
            embed = cls(img_size, projection.in_channels, projection.out_channels,
                        conv_cfg=dict(kernel_size=projection.kernel_size, stride=projection.stride,
                                      padding=projection.padding, dilation=projection.dilation))
        embed.projection, embed.norm = projection, norm
        return embed
