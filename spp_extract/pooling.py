"""Spatial Pyramid Pooling (He et al., 2014), exact for every feature-map size.

Bin ``i`` of ``n`` along an axis of length ``a`` covers ``[floor(i*a/n), ceil((i+1)*a/n))``:
the rule of the SPP-net authors' released code and of PyTorch's adaptive pooling. It always
gives ``n`` bins that cover every cell, also when ``a < n`` (bins then overlap and a 1x1 map is
replicated into every bin). The paper's text formula (window ``ceil(a/n)``, stride
``floor(a/n)``) does not: for ``a=11, n=4`` it drops columns 9 and 10.

Vector layout: for each level in the given order, the ``(C, n, n)`` block flattened C-major
(``flatten(1)`` of an ``N x C x n x n`` tensor); blocks concatenated. Its length is
``C * sum(n*n for n in levels)`` whatever the input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PoolingMode = Literal["max", "avg"]


def spp_dim(channels: int, levels: Sequence[int]) -> int:
    """Length of the SPP vector for a feature map with ``channels`` channels."""
    return channels * sum(n * n for n in levels)


def spatial_pyramid_pool(x: Tensor, levels: Sequence[int], mode: PoolingMode = "max") -> Tensor:
    """Pool ``x: Tensor[N, C, H, W]`` over an ``n x n`` grid per level; returns ``Tensor[N, D]``.

    ``D = spp_dim(C, levels)``. Any ``H, W >= 1`` works. ``mode`` is ``"max"`` or ``"avg"``.
    """
    if mode == "max":
        pool = F.adaptive_max_pool2d
    elif mode == "avg":
        pool = F.adaptive_avg_pool2d
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; expected 'max' or 'avg'")
    if x.dim() != 4 or x.shape[-1] < 1 or x.shape[-2] < 1:
        raise ValueError(f"expected a non-empty N x C x H x W tensor, got shape {tuple(x.shape)}")
    # each block: (N, C, n, n) -> (N, C*n*n)
    return torch.cat([pool(x, n).flatten(1) for n in levels], dim=1)


class SpatialPyramidPooling(nn.Module):
    """Module form of :func:`spatial_pyramid_pool`."""

    def __init__(self, levels: Sequence[int] = (4, 2, 1), mode: PoolingMode = "max") -> None:
        super().__init__()
        self.levels = tuple(int(n) for n in levels)
        self.mode: PoolingMode = mode

    def output_dim(self, channels: int) -> int:
        return spp_dim(channels, self.levels)

    def forward(self, x: Tensor) -> Tensor:
        return spatial_pyramid_pool(x, self.levels, self.mode)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}"
