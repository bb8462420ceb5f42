"""Precision, recall, density and coverage on k-NN manifolds (Naeem et al. 2020, clovaai/generative-evaluation-prdc)."""

from __future__ import annotations

import numpy as np

from jaxdiff.metrics.features import as_features, same_width

NEAREST_K = 5
# Rows of a distance block: keeps block x N float64 distances near 256 MB whatever N is.
_BLOCK_ELEMENTS = 1 << 25


def _sq_norms(x):
    return np.einsum("ij,ij->i", x, x)


def _distances(a, b, a_sq, b_sq):
    """Euclidean distances [len(a), len(b)] in float64, as sklearn's euclidean_distances computes them."""
    d2 = a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]
    return np.sqrt(np.maximum(d2, 0.0))


def _blocks(n_rows: int, n_cols: int):
    step = max(1, _BLOCK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def knn_radii(x, k: int = NEAREST_K) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row (the (k+1)-th smallest distance, self included)."""
    sq = _sq_norms(x)
    radii = np.empty(len(x))
    for rows in _blocks(len(x), len(x)):
        d = _distances(x[rows], x, sq[rows], sq)
        d[np.arange(d.shape[0]), np.arange(rows.start, rows.stop)] = 0.0  # self-distance exactly 0, as sklearn
        radii[rows] = np.partition(d, k, axis=1)[:, k]
    return radii


def prdc(real, fake, *, nearest_k: int = NEAREST_K) -> dict[str, float]:
    """precision, recall, density, coverage of features real [N, D] and fake [M, D] (float64, blockwise in memory).

    With r_i the k-NN radius of real i and s_j that of fake j (strict comparisons, as the reference):
    precision = mean_j [∃i d(i, j) < r_i]; recall = mean_i [∃j d(i, j) < s_j];
    density = mean_j #{i : d(i, j) < r_i} / k; coverage = mean_i [min_j d(i, j) < r_i].
    """
    need = nearest_k + 1
    why = f"each point's {nearest_k} nearest neighbours besides itself"
    real = as_features(real, "real", "PRDC", need, why)
    fake = as_features(fake, "fake", "PRDC", need, why)
    same_width(real, fake, "PRDC")
    real_radii, fake_radii = knn_radii(real, nearest_k), knn_radii(fake, nearest_k)
    real_sq, fake_sq = _sq_norms(real), _sq_norms(fake)
    fake_covered = np.zeros(len(fake), bool)
    fake_counts = np.zeros(len(fake), np.int64)
    recalled = np.zeros(len(real), bool)
    covering = np.zeros(len(real), bool)
    for rows in _blocks(len(real), len(fake)):
        d = _distances(real[rows], fake, real_sq[rows], fake_sq)
        inside_real = d < real_radii[rows, None]
        fake_covered |= inside_real.any(axis=0)
        fake_counts += inside_real.sum(axis=0)
        recalled[rows] = (d < fake_radii[None, :]).any(axis=1)
        covering[rows] = d.min(axis=1) < real_radii[rows]
    return {
        "precision": float(fake_covered.mean()),
        "recall": float(recalled.mean()),
        "density": float(fake_counts.mean() / nearest_k),
        "coverage": float(covering.mean()),
    }
