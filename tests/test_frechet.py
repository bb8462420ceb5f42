"""The Fréchet distance against a direct computation (eigen-decomposition), closed forms and its invariants."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from jaxdiff.metrics import frechet


def _direct(f1, f2):
    """d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1^½ S2 S1^½)^½), square roots by symmetric eigh."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_matches_a_direct_eigendecomposition():
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    f2 = rng.normal(1.0, 2.0, size=(300, 12)) @ rng.normal(size=(12, 12)) + 0.5
    d = frechet.frechet_distance_from_features(f1, f2)
    assert d == pytest.approx(_direct(f1, f2), rel=1e-6)
    assert d > 1.0
    # and with scipy's sqrtm written out by hand
    mu1, s1 = frechet.feature_statistics(f1)
    mu2, s2 = frechet.feature_statistics(f2)
    by_hand = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert d == pytest.approx(by_hand, rel=1e-6)


def test_diagonal_closed_form_and_invariants():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    # symmetric, zero for identical statistics
    assert frechet.frechet_distance(mu2, np.diag(v2), mu1, np.diag(v1)) == pytest.approx(expected, rel=1e-9)
    assert frechet.frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-9)
    # a mean shift of the same covariance adds exactly |shift|²
    rng = np.random.default_rng(1)
    f = rng.normal(size=(500, 6))
    assert frechet.frechet_distance_from_features(f, f + 3.0) == pytest.approx(9.0 * 6, rel=1e-6)


def test_singular_covariances_and_bad_input():
    rng = np.random.default_rng(2)
    few = rng.normal(size=(5, 16))  # fewer samples than dimensions: singular covariances
    d = frechet.frechet_distance_from_features(few, rng.normal(size=(5, 16)))
    assert np.isfinite(d) and d > 0
    with pytest.raises(ValueError, match="mismatched"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet.feature_statistics(np.zeros((1, 3)))
