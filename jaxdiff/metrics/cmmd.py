"""CMMD ("Rethinking FID", Jayasumana et al. 2024): RBF-kernel MMD of CLIP image embeddings, as google-research/cmmd."""

from __future__ import annotations

import numpy as np

from jaxdiff.metrics.features import as_features, same_width

SIGMA = 10.0
SCALE = 1000.0
# Rows of a kernel block: keeps block x N float64 values near 256 MB.
_BLOCK_ELEMENTS = 1 << 25


def _kernel_mean(a, b, gamma: float) -> float:
    """mean_{i,j} exp(-gamma |a_i - b_j|²), |.|² expanded as the reference does, accumulated blockwise in float64."""
    a_sq, b_sq = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
    step = max(1, _BLOCK_ELEMENTS // len(b))
    total = 0.0
    for start in range(0, len(a), step):
        rows = slice(start, start + step)
        d2 = -2.0 * (a[rows] @ b.T) + a_sq[rows, None] + b_sq[None, :]
        total += np.exp(-gamma * d2).sum()
    return total / (len(a) * len(b))


def cmmd(x, y, *, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """scale · MMD² of reference embeddings x [N, D] and evaluated ones y [M, D] with the kernel
    k(a, b) = exp(-|a - b|² / (2 sigma²)): the biased (minimum-variance, diagonal-included) estimator
    google-research/cmmd `distance.mmd` computes, here in float64.

    CMMD proper feeds L2-normalised CLIP ViT-L/14@336 image embeddings (the reference: images center-cropped to a
    square, PIL-bicubic resized to 336; `CLIPImageConfig(..., crop_first=True)` and `image_embeddings(...,
    normalize=True)` in `jaxdiff.metrics.clip_score`).
    """
    x = as_features(x, "reference", "CMMD", 1)
    y = as_features(y, "evaluated", "CMMD", 1)
    same_width(x, y, "CMMD", names=("reference", "evaluated"))
    gamma = 1.0 / (2.0 * sigma**2)
    k_xx, k_yy, k_xy = _kernel_mean(x, x, gamma), _kernel_mean(y, y, gamma), _kernel_mean(x, y, gamma)
    return float(scale * (k_xx + k_yy - 2.0 * k_xy))
