"""Full-reference image quality: PSNR and SSIM (Wang et al. 2004) of image pairs, per image, in NumPy."""

from __future__ import annotations

import numpy as np


def _float(images) -> np.ndarray:
    x = np.asarray(images)
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def psnr(a, b, data_range: float = 1.0) -> np.ndarray:
    """PSNR in dB per image [N] of images [N, H, W, C] (uint8 or float in [0, 1]); inf where identical."""
    a, b = _float(a), _float(b)
    mse = np.mean(np.square(a - b), axis=tuple(range(1, a.ndim)))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def ssim(a, b, data_range: float = 1.0, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """Mean SSIM per image [N] of images [N, H, W, C] (uint8 or float in [0, 1]), channels averaged: Wang et al.
    (2004) eq. 13 with an 11x11 Gaussian window (σ = 1.5), sample covariances, and the border of half a window left
    out of the mean (scikit-image's structural_similarity with gaussian_weights=True)."""
    from scipy.ndimage import gaussian_filter

    a, b = _float(a), _float(b)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two [N, H, W, C] batches of one shape, got {a.shape} and {b.shape}")
    truncate, win = 3.5, 11
    cov_norm = win * win / (win * win - 1.0)

    def blur(x):  # over H and W only
        return gaussian_filter(x, sigma=(0, sigma, sigma, 0), truncate=truncate, mode="reflect")

    ma, mb = blur(a), blur(b)
    va = cov_norm * (blur(a * a) - ma * ma)
    vb = cov_norm * (blur(b * b) - mb * mb)
    cab = cov_norm * (blur(a * b) - ma * mb)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    pad = (win - 1) // 2
    return s[:, pad:-pad, pad:-pad].mean(axis=(1, 2, 3))
