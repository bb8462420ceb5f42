"""KID, Inception Score, PRDC and CMMD against references written here from the spec's formulas (§4.6) and the
reference repositories' definitions; float64 references agree to 1e-9 relative, float32 ones as stated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from jaxdiff.errors import UserError
from jaxdiff.metrics import prdc as prdc_lib
from jaxdiff.metrics.cmmd import cmmd
from jaxdiff.metrics.inception_score import inception_score
from jaxdiff.metrics.kid import kid, polynomial_mmd2
from jaxdiff.metrics.prdc import prdc


def _features(seed, n, d, shift=0.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) + shift).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- KID


def _mmd2_by_pairs(x, y, d):
    """§4.6 literally: k(a, b) = (aᵀb / d + 1)³, sums over i ≠ j, in torch float64 (not numpy's matmul path)."""
    x, y = torch.from_numpy(x).double(), torch.from_numpy(y).double()
    m = len(x)
    k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    off = ~torch.eye(m, dtype=torch.bool)
    return float((k_xx[off].sum() + k_yy[off].sum()) / (m * (m - 1)) - 2 * k_xy.sum() / m**2)


def _kid_reference(real, fake, subsets, m, seed=2020):
    """torch-fidelity's subset draws: RandomState(seed), per subset choice(N1, m) then choice(N2, m), no replacement."""
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        values.append(_mmd2_by_pairs(x, y, real.shape[1]))
    return np.mean(values), np.std(values)


def test_kid_matches_the_formula_with_torch_fidelity_s_draws():
    from jaxdiff.metrics import kid as kid_lib

    # torch-fidelity's defaults: 100 subsets of 1000, degree 3, gamma 1/D, coef0 1, seed 2020 (its own function is
    # compared in test_kid_is_and_prdc_equal_torch_fidelity_and_the_prdc_package); fewer, smaller subsets here.
    defaults = (kid_lib.SUBSETS, kid_lib.SUBSET_SIZE, kid_lib.DEGREE, kid_lib.COEF0, kid_lib.SEED)
    assert defaults == (100, 1000, 3, 1, 2020)
    real, fake = _features(0, 400, 64), _features(1, 450, 64, shift=0.1)
    mean, std = kid(real, fake, subsets=10, subset_size=300)
    ref_mean, ref_std = _kid_reference(real, fake, 10, 300)
    assert mean == pytest.approx(ref_mean, rel=1e-9) and std == pytest.approx(ref_std, rel=1e-9)
    assert mean > 5 * std  # the shifted set is detected


def test_kid_is_unbiased_near_zero_for_one_distribution():
    real, fake = _features(2, 400, 16), _features(3, 400, 16)
    mean, std = kid(real, fake, subsets=50, subset_size=200)
    assert mean == pytest.approx(_kid_reference(real, fake, 50, 200)[0], rel=1e-9)
    assert abs(mean) < 3 * std  # no positive bias, unlike the biased estimator


def test_kid_subset_estimate_equals_clean_fid_expression():
    # clean-fid's kernel_distance body for one subset (a = k_xx + k_yy, b = k_xy; diagonals dropped).
    x, y = _features(4, 50, 8).astype(np.float64), _features(5, 50, 8).astype(np.float64)
    n, m = x.shape[1], len(x)
    a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
    b = (x @ y.T / n + 1) ** 3
    clean = ((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m
    assert polynomial_mmd2(x, y) == pytest.approx(clean, rel=1e-9)


def test_kid_refuses_too_few_samples_and_mismatched_widths():
    with pytest.raises(UserError, match="KID needs at least 1000 fake samples .*subsets of 1000.*, got 999"):
        kid(_features(0, 1000, 4), _features(1, 999, 4))
    with pytest.raises(UserError, match="different dimensions \\(4 vs 5\\)"):
        kid(_features(0, 20, 4), _features(1, 20, 5), subset_size=10)


# ---------------------------------------------------------------------------------------------------- IS


def _is_reference(logits, splits, seed=2020):
    """§4.6: IS_k = exp(mean_x Σ_y p(y|x) [log p(y|x) - log p̄_k(y)]) on rows shuffled as torch-fidelity does."""
    x = torch.from_numpy(logits[np.random.RandomState(seed).permutation(len(logits))]).double()
    p = torch.softmax(x, dim=1)
    n, scores = len(x), []
    for k in range(splits):
        pk = p[k * n // splits : (k + 1) * n // splits]
        scores.append(float(torch.exp((pk * (pk.log() - pk.mean(0, keepdim=True).log())).sum(1).mean())))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_the_formula_from_logits_and_from_probs():
    logits = _features(6, 1003, 1008) * 3  # 1003 rows: unequal splits
    mean, std = inception_score(logits)
    ref = _is_reference(logits, 10)
    assert mean == pytest.approx(ref[0], rel=1e-9) and std == pytest.approx(ref[1], rel=1e-9)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)), np.float64)
    assert inception_score(probs, inputs="probs").mean == pytest.approx(ref[0], rel=1e-5)  # float32 softmax


def test_inception_score_of_confident_predictions_over_c_classes_is_c():
    onehot = np.eye(8)[np.arange(800) % 8]  # each split sees all 8 classes equally often
    assert inception_score(onehot, inputs="probs", shuffle=False) == pytest.approx((8.0, 0.0))
    assert inception_score(np.zeros((50, 8)), splits=5).mean == pytest.approx(1.0)  # uniform: no information


def test_inception_score_needs_a_sample_per_split():
    with pytest.raises(UserError, match="Inception Score needs at least 10 logits samples \\(one per split"):
        inception_score(np.zeros((9, 1008)))


# ---------------------------------------------------------------------------------------------------- PRDC


def _prdc_reference(real, fake, k):
    """Naeem et al. 2020 (clovaai/generative-evaluation-prdc compute_prdc) with scipy's distances and full sorts."""
    radius = lambda x: np.sort(cdist(x, x), axis=1)[:, k]  # noqa: E731 - (k+1)-th smallest, self included
    r_real, r_fake, d = radius(real), radius(fake), cdist(real, fake)
    return {
        "precision": (d < r_real[:, None]).any(axis=0).mean(),
        "recall": (d < r_fake[None, :]).any(axis=1).mean(),
        "density": (d < r_real[:, None]).sum(axis=0).mean() / k,
        "coverage": (d.min(axis=1) < r_real).mean(),
    }


@pytest.mark.parametrize("block_elements", [1 << 25, 1000])  # one block; many blocks of 4-6 rows
def test_prdc_matches_naeem_et_al(monkeypatch, block_elements):
    monkeypatch.setattr(prdc_lib, "_BLOCK_ELEMENTS", block_elements)
    real, fake = _features(7, 240, 16), _features(8, 170, 16, shift=0.3)
    out, ref = prdc(real, fake, nearest_k=5), _prdc_reference(real.astype(np.float64), fake.astype(np.float64), 5)
    assert out == pytest.approx(ref, abs=1e-12)
    assert 0 < out["precision"] < 1 and 0 < out["coverage"] < 1  # a non-degenerate case


def test_prdc_of_a_set_with_itself_is_perfect():
    x = _features(9, 100, 8)
    out = prdc(x, x)
    assert out["precision"] == out["recall"] == out["coverage"] == 1.0


def test_prdc_needs_more_points_than_neighbours():
    with pytest.raises(UserError, match="PRDC needs at least 6 real samples"):
        prdc(_features(0, 5, 4), _features(1, 50, 4))


# ---------------------------------------------------------------------------------------------------- CMMD


def _cmmd_google_research(x, y):
    """google-research/cmmd distance.mmd as published: JAX, float32, sigma 10, scale 1000, diagonals included."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    x_sq, y_sq = jnp.diag(x @ x.T), jnp.diag(y @ y.T)
    gamma = 1 / (2 * 10**2)

    def k(a, b, a_sq, b_sq):
        return jnp.mean(jnp.exp(-gamma * (-2 * a @ b.T + a_sq[:, None] + b_sq[None, :])))

    return float(1000 * (k(x, x, x_sq, x_sq) + k(y, y, y_sq, y_sq) - 2 * k(x, y, x_sq, y_sq)))


def _cmmd_pairwise(x, y):
    """The biased MMD² by explicit differences in float64: scale · mean k_xx + mean k_yy - 2 mean k_xy."""
    k = lambda a, b: np.exp(-cdist(a, b, "sqeuclidean") / 200).mean()  # noqa: E731
    return 1000 * (k(x, x) + k(y, y) - 2 * k(x, y))


def test_cmmd_matches_google_research_and_the_formula():
    unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)  # noqa: E731 - CMMD embeddings are normalised
    x, y = unit(_features(10, 300, 32)), unit(_features(11, 257, 32, shift=0.2))
    value = cmmd(x, y)
    assert value == pytest.approx(_cmmd_pairwise(x.astype(np.float64), y.astype(np.float64)), rel=1e-9)
    with jax.default_matmul_precision("highest"):
        # float32 cancellation in k_xx + k_yy - 2 k_xy (each ~0.99): ~1e-4 absolute at scale 1000.
        assert value == pytest.approx(_cmmd_google_research(x, y), abs=5e-4)
    assert value > 0.1 and cmmd(x, x) == pytest.approx(0.0, abs=1e-9)


def test_cmmd_refuses_mismatched_embeddings():
    with pytest.raises(UserError, match="CMMD: reference and evaluated features have different dimensions"):
        cmmd(_features(0, 10, 768), _features(1, 10, 1024))
    with pytest.raises(UserError, match="CMMD needs at least 1 evaluated samples, got 0"):
        cmmd(_features(0, 10, 8), np.zeros((0, 8)))


# ------------------------------------------------------------------------- the references' own functions


def test_kid_is_and_prdc_equal_torch_fidelity_and_the_prdc_package():
    """Goldens from tools/make_metric_goldens.py --only features (torch-fidelity 0.4's kid_features_to_metric and
    isc_features_to_metric, prdc 0.2's compute_prdc) on the same stored float32 features: ≤ 1e-6 absolute (KID, IS),
    PRDC to 1e-12 (counts over k-NN balls: any disagreement is at least 1/180)."""
    import os

    g = np.load(os.path.join(os.path.dirname(__file__), "goldens", "feature_metrics.npz"))
    real, fake, logits = g["input/real"], g["input/fake"], g["input/logits"]
    k = kid(real, fake, subsets=20, subset_size=100)
    assert abs(k.mean - g["kid/mean"]) <= 1e-6 and abs(k.std - g["kid/std"]) <= 1e-6
    s = inception_score(logits, splits=5)
    assert abs(s.mean - g["is/mean"]) <= 1e-6 and abs(s.std - g["is/std"]) <= 1e-6
    for nearest_k in (3, 5):
        ours = prdc(real, fake, nearest_k=nearest_k)
        assert ours == pytest.approx({name: float(g[f"prdc/k{nearest_k}/{name}"]) for name in ours}, abs=1e-12)
