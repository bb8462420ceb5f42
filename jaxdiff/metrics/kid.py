"""Kernel Inception Distance: the unbiased polynomial-kernel MMD² averaged over random subsets, as torch-fidelity."""

from __future__ import annotations

import numpy as np

from jaxdiff.metrics.features import MeanStd, as_features, same_width

# torch-fidelity's defaults (kid_subsets, kid_subset_size, kid_degree, kid_coef0, rng_seed); gamma None = 1 / D.
SUBSETS = 100
SUBSET_SIZE = 1000
DEGREE = 3
COEF0 = 1.0
SEED = 2020


def polynomial_mmd2(x, y, degree: int = DEGREE, gamma: float | None = None, coef0: float = COEF0) -> float:
    """Unbiased MMD² of two equal-size sets x, y [m, D] with k(a, b) = (gamma a·b + coef0)^degree:
    (Σ_{i≠j} k(x_i, x_j) + Σ_{i≠j} k(y_i, y_j)) / (m (m - 1)) - 2 Σ_{i,j} k(x_i, y_j) / m²."""
    m = x.shape[0]
    gamma = 1.0 / x.shape[1] if gamma is None else gamma

    def kernel(a, b):
        return (a @ b.T * gamma + coef0) ** degree

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    off_diagonal = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
    return float(off_diagonal / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid(
    real,
    fake,
    *,
    subsets: int = SUBSETS,
    subset_size: int = SUBSET_SIZE,
    degree: int = DEGREE,
    gamma: float | None = None,
    coef0: float = COEF0,
    seed: int = SEED,
) -> MeanStd:
    """KID of features real [N1, D] and fake [N2, D]: mean and std of the unbiased MMD² over `subsets` pairs of
    subsets of `subset_size` rows drawn without replacement, in float64.

    The subsets are drawn exactly as torch-fidelity draws them (`np.random.RandomState(seed)`, then per subset
    `choice(N1, m, replace=False)` for real and `choice(N2, m, replace=False)` for fake), so with its defaults the
    same features give torch-fidelity's value (which computes the kernels in the features' float32). Often
    reported ×10³.
    """
    if subset_size < 2:
        raise ValueError(f"subset_size must be at least 2 for the unbiased estimator, got {subset_size}")
    why = f"subsets of {subset_size}; pass a smaller subset_size (at most the smaller set) or use more images"
    real = as_features(real, "real", "KID", subset_size, why)
    fake = as_features(fake, "fake", "KID", subset_size, why)
    same_width(real, fake, "KID")
    rng = np.random.RandomState(seed)
    values = np.zeros(subsets)
    for i in range(subsets):
        x = real[rng.choice(len(real), subset_size, replace=False)]
        y = fake[rng.choice(len(fake), subset_size, replace=False)]
        values[i] = polynomial_mmd2(x, y, degree, gamma, coef0)
    return MeanStd(float(np.mean(values)), float(np.std(values)))
