"""Fréchet distance between two Gaussians fitted to feature sets (as FID, on any features), as pytorch-fid does."""

from __future__ import annotations

import numpy as np
from scipy import linalg


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, float64) of features [N, D]."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d² = |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½), the matrix square root by scipy.linalg.sqrtm.

    As pytorch-fid: if the product is singular (sqrtm not finite) `eps` is added to both diagonals; a
    numerically complex result is accepted when its imaginary part is negligible.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm gave a complex result (imaginary part up to {np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_from_features(features1, features2) -> float:
    """Fréchet distance between Gaussians fitted to features1 [N1, D] and features2 [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def frechet_distance_few(mu1, sigma1, mu2, sigma2) -> float:
    """`frechet_distance`, or with few samples (N < D: singular covariances, sqrtm may come back complex) the same
    with 1e-4 x the mean variance added to both diagonals (a ridge, as pytorch-fid's eps offset, but large enough to
    make the product well posed)."""
    try:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    except ValueError:
        ridge = 1e-4 * float(np.mean(np.concatenate([np.diag(sigma1), np.diag(sigma2)]))) * np.eye(len(mu1))
        return frechet_distance(mu1, sigma1 + ridge, mu2, sigma2 + ridge)
