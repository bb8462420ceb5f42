"""The one optimiser and learning-rate schedule builder used by every training run (train, erase, shapes stages)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from jaxdiff.errors import UserError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "cosine_with_restarts", "linear")


def schedule(
    learning_rate: float,
    total_steps: int,
    *,
    kind: str = "constant",
    warmup_steps: int = 0,
    cycles: int = 1,
    final_fraction: float = 0.0,
) -> Callable:
    """Linear warm-up from 0 for `warmup_steps`, then constant, cosine or linear decay to `final_fraction` of the
    rate (0 by default) at `total_steps`, or `cycles` cosine decays with hard restarts (SPM's
    cosine_with_restarts), each down to that fraction."""
    if kind not in SCHEDULES:
        raise UserError(f"learning-rate schedule must be one of {SCHEDULES}, got {kind!r}")
    if not 0.0 <= final_fraction <= 1.0:
        raise UserError(f"final_fraction must be in [0, 1], got {final_fraction}")
    lr, warm, alpha = float(learning_rate), int(warmup_steps), float(final_fraction)
    rest = max(int(total_steps) - warm, 1)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=alpha)
    elif kind == "linear":
        after = optax.linear_schedule(lr, lr * alpha, rest)
    else:
        length = max(rest // max(int(cycles), 1), 1)
        after = optax.join_schedules(
            [optax.cosine_decay_schedule(lr, length, alpha=alpha) for _ in range(int(cycles))],
            [length * i for i in range(1, int(cycles))],
        )
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def optimizer(
    name: str,
    learning_rate: Callable | float,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_mask: Any = None,
) -> optax.GradientTransformation:
    """Adam / AdamW (PyTorch's defaults: betas 0.9/0.999, eps 1e-8) or SGD (momentum b1 when > 0). `decay_mask`
    (AdamW): which leaves weight decay applies to, a bool tree or params -> bool tree (e.g. `kernels_only`); None:
    all. Clipping is the step's job (it computes the gradient norm anyway)."""
    if name == "adamw":
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if name == "adam":
        return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=b1 or None)
    raise UserError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def kernels_only(params: Any) -> Any:
    """A weight-decay mask: kernels only; biases, norm scales and embeddings are not decayed (the shapes stages
    train with it)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: str(getattr(path[-1], "key", "")) == "kernel", params)
