"""The maths of retrieval post-processing, on tensors: signed power, L2 normalisation, PCA
without a D x D matrix, and the numerical rank of a sample.

The principal axes come from the SVD of the centred sample itself: exact
(``torch.linalg.svd``) when the sample's smaller side is small, randomised
(``torch.svd_lowrank``, Halko et al. 2011) otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

EXACT_SIDE = 1024  # exact SVD when the sample's smaller side is at most this (or near 2 x dim)


def signed_power(x: Tensor, power: float) -> Tensor:
    """``sign(x) * |x| ** power`` (power normalisation; ``power = 1`` is the identity)."""
    return x if power == 1 else x.sign() * x.abs().pow(power)


def l2_normalize(x: Tensor) -> Tensor:
    """Rows of ``x`` (Tensor[N, D]) scaled to unit L2 norm; a zero row stays zero. Each row
    is divided by its largest magnitude first, so that rows whose squares overflow float32
    (values beyond about 1e19) are normalised right, not turned into zeros."""
    peak = x.abs().amax(dim=1, keepdim=True)  # (N, 1)
    x = x / torch.where(peak > 0, peak, torch.ones_like(peak))
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # (N, 1)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def preprocess(x: Tensor, power: float, l2: bool) -> Tensor:
    """The steps before centring: signed power, then L2 (Tensor[n, D] -> float32)."""
    x = signed_power(x.float(), power)
    return l2_normalize(x) if l2 else x


def pca(
    x: Tensor,
    dim: int,
    *,
    method: Literal["auto", "exact", "lowrank"] = "auto",
    oversample: int | None = None,
    niter: int = 6,
    inplace: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Principal axes of the rows of ``x`` (Tensor[n, D], float32), without a D x D matrix.

    Returns ``(mean Tensor[D], components Tensor[dim, D] with orthonormal rows, explained
    variance Tensor[dim] float64)``, variance with the ``n - 1`` denominator, largest first. Each
    component's largest-magnitude entry is positive, so the signs do not depend on the device.
    ``exact``: ``torch.linalg.svd`` of the centred sample (cost n·D·min(n, D));
    ``lowrank``: ``torch.svd_lowrank`` with ``dim + oversample`` columns and ``niter`` power
    iterations (cost about n·D·(dim + oversample)·(2·niter + 2)); ``auto``: exact when
    ``min(n, D) <= 1024`` or when dim + oversample is at least half of it. ``inplace``: centre
    ``x`` itself instead of a copy (the sample can be most of the memory).
    """
    n, d = x.shape
    mean = _blockwise_mean(x)
    x = x.sub_(mean.to(x.dtype)) if inplace else x - mean.to(x.dtype)  # (n, D), centred
    side = min(n, d)
    q = min(side, dim + (oversample if oversample is not None else max(10, dim // 2)))
    if method == "auto":
        method = "exact" if side <= EXACT_SIDE or 2 * q >= side else "lowrank"
    if method == "exact":
        _, s, vh = torch.linalg.svd(x, full_matrices=False)  # s (side,), vh (side, D)
        components, s = vh[:dim], s[:dim]
    else:
        _, s, v = torch.svd_lowrank(x, q=q, niter=niter)  # v (D, q)
        components, s = v[:, :dim].T, s[:dim]
    signs = components.gather(1, components.abs().argmax(1, keepdim=True)).sign()  # (dim, 1)
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    variance = s.double().square() / max(n - 1, 1)
    return mean.float(), components.contiguous(), variance


def _float64_rows(x: Tensor) -> Iterator[Tensor]:
    """``x`` in float64 blocks of about 64 MiB: sums in float64 without a float64 copy of
    the whole sample."""
    step = max(1, (64 << 20) // (8 * max(1, x.shape[1])))
    for start in range(0, x.shape[0], step):
        yield x[start : start + step].double()


def _blockwise_mean(x: Tensor) -> Tensor:
    return sum(block.sum(0) for block in _float64_rows(x)) / x.shape[0]


def numerical_rank(variance: Tensor, rows: int, dim: int) -> int:
    """How many principal axes of a float32 sample carry more than rounding: singular values
    over ``s_max * max(rows, dim) * eps`` (the rule of ``numpy.linalg.matrix_rank``), with
    ``variance = s**2 / (rows - 1)``, largest first. At least 1."""
    if not len(variance) or float(variance[0]) <= 0:
        return 1
    tolerance = max(rows, dim) * torch.finfo(torch.float32).eps
    ratio = (variance.double() / float(variance[0])).clamp_min(0).sqrt()  # s / s_max
    return max(1, int((ratio > tolerance).sum()))
