"""RelativePosition2D: the image relative position encoding (iRPE) of AutoFormer's attention, as mmrazor builds it.

``RelativePosition2D(head_dims, max_relative_position=14)`` holds two tables ``[2 * max_relative_position + 2,
head_dims]`` (vertical and horizontal distances; row 0 is the class token's). ``forward(length_q, length_k)`` ->
``[length_q, length_k, head_dims]``: for tokens 1.. laid out on a ``sqrt(length_q - 1)``-wide grid, the row and
column distances, clipped to ``+-max_relative_position`` and shifted to ``1 ..``, look up the two tables and add;
the class token (index 0) reads row 0. A plain layer: the one ``DynamicRelativePosition2D.export()`` returns.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RelativePosition2D", "relative_position_index"]


def relative_position_index(length_q: int, length_k: int, max_relative_position: int,
                            device=None) -> Tuple[Tensor, Tensor]:
    """(vertical, horizontal) int64 ``[length_q, length_k]`` row indices into the tables (0 for the class token)."""
    q = torch.arange(length_q - 1, device=device)
    k = torch.arange(length_k - 1, device=device)
    side = int((length_q - 1) ** 0.5)
    limit = max_relative_position
    vertical = (k[None, :] // side - q[:, None] // side).clamp(-limit, limit) + limit + 1
    horizontal = (k[None, :] % side - q[:, None] % side).clamp(-limit, limit) + limit + 1
    return F.pad(vertical, (1, 0, 1, 0)), F.pad(horizontal, (1, 0, 1, 0))


class RelativePosition2D(nn.Module):
    """Relative position embeddings ``[length_q, length_k, head_dims]`` of a class token plus a square token grid."""

    def __init__(self, head_dims: int, max_relative_position: int = 14):
        super().__init__()
        self.head_dims = head_dims
        self.max_relative_position = max_relative_position
        rows = max_relative_position * 2 + 2
        self.embeddings_table_v = nn.Parameter(nn.init.trunc_normal_(torch.empty(rows, head_dims), std=0.02))
        self.embeddings_table_h = nn.Parameter(nn.init.trunc_normal_(torch.empty(rows, head_dims), std=0.02))

    def forward(self, length_q: int, length_k: int) -> Tensor:
        return self._embed(length_q, length_k, self.embeddings_table_v, self.embeddings_table_h)

    def _embed(self, length_q: int, length_k: int, table_v: Tensor, table_h: Tensor) -> Tensor:
        vertical, horizontal = relative_position_index(length_q, length_k, self.max_relative_position,
                                                       table_v.device)
        return table_v[vertical] + table_h[horizontal]
