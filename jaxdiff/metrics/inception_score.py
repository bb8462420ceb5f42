"""Inception Score over splits, as torch-fidelity computes it (float64, samples shuffled with seed 2020)."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from jaxdiff.errors import UserError
from jaxdiff.metrics.features import MeanStd, as_features

SPLITS = 10
SEED = 2020


def inception_score(
    x, *, splits: int = SPLITS, inputs: str = "logits", shuffle: bool = True, seed: int = SEED
) -> MeanStd:
    """IS of class scores x [N, C]: per split k, exp(mean_i KL(p(y|x_i) || p̄_k)) with p̄_k the split's mean class
    distribution; the mean and (ddof=0) std over `splits` splits.

    inputs="logits": x are logits (torch-fidelity and StyleGAN feed the Inception fc output without its bias,
    `logits_unbiased`); "probs": x are already softmax probabilities (0·log 0 = 0). Rows are permuted with
    `np.random.RandomState(seed).permutation(N)` first (torch-fidelity's `samples_shuffle`), then split
    k = rows [k N // splits, (k + 1) N // splits).
    """
    if inputs not in ("logits", "probs"):
        raise ValueError(f"inputs must be 'logits' or 'probs', got {inputs!r}")
    f = as_features(x, inputs, "Inception Score", splits, f"one per split, {splits} splits")
    n = len(f)
    if shuffle:
        f = f[np.random.RandomState(seed).permutation(n)]
    if inputs == "logits":
        log_p = log_softmax(f, axis=1)
        p = np.exp(log_p)
    else:
        if (f < 0).any() or not np.allclose(f.sum(axis=1), 1.0, atol=1e-3):
            raise UserError("Inception Score: probs must be non-negative rows summing to 1 (pass inputs='logits')")
        p = f
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    scores = []
    for k in range(splits):
        p_k, log_p_k = p[k * n // splits : (k + 1) * n // splits], log_p[k * n // splits : (k + 1) * n // splits]
        log_mean = np.log(p_k.mean(axis=0, keepdims=True))
        with np.errstate(invalid="ignore"):  # 0 * -inf where a probability is 0: the term is 0
            kl = np.where(p_k > 0, p_k * (log_p_k - log_mean), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return MeanStd(float(np.mean(scores)), float(np.std(scores)))
