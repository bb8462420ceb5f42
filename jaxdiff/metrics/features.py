"""Checks shared by the metrics on feature sets: 2-D finite float64 arrays, enough rows, matching widths."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxdiff.errors import UserError


class MeanStd(NamedTuple):
    """A metric over subsets or splits: the mean and the (population, ddof=0) standard deviation of its values."""

    mean: float
    std: float


def as_features(x, name: str, metric: str, at_least: int, why: str = "") -> np.ndarray:
    """x as a float64 [N, D] array with N >= at_least; otherwise one UserError naming how many are needed."""
    f = np.asarray(x, dtype=np.float64)
    if f.ndim != 2:
        raise UserError(f"{metric}: {name} features must be a 2-D array [N, D], got shape {f.shape}")
    if f.shape[0] < at_least:
        reason = f" ({why})" if why else ""
        raise UserError(f"{metric} needs at least {at_least} {name} samples{reason}, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise UserError(f"{metric}: {name} features contain NaN or infinite values")
    return f


def same_width(a: np.ndarray, b: np.ndarray, metric: str, names=("real", "fake")) -> None:
    if a.shape[1] != b.shape[1]:
        raise UserError(
            f"{metric}: {names[0]} and {names[1]} features have different dimensions ({a.shape[1]} vs {b.shape[1]}):"
            " were they extracted by the same network and layer?"
        )
