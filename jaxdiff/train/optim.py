"""The one optimiser and learning-rate schedule builder used by every training run (train, erase, shapes stages)."""

from __future__ import annotations

from collections.abc import Callable

import optax

from jaxdiff.errors import UserError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "cosine_with_restarts", "linear")


def schedule(
    learning_rate: float, total_steps: int, *, kind: str = "constant", warmup_steps: int = 0, cycles: int = 1
) -> Callable:
    """Linear warm-up from 0 for `warmup_steps`, then constant, cosine or linear decay to 0 at `total_steps`, or
    `cycles` cosine decays with hard restarts (SPM's cosine_with_restarts)."""
    if kind not in SCHEDULES:
        raise UserError(f"learning-rate schedule must be one of {SCHEDULES}, got {kind!r}")
    lr, warm = float(learning_rate), int(warmup_steps)
    rest = max(int(total_steps) - warm, 1)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, rest)
    elif kind == "linear":
        after = optax.linear_schedule(lr, 0.0, rest)
    else:
        length = max(rest // max(int(cycles), 1), 1)
        after = optax.join_schedules(
            [optax.cosine_decay_schedule(lr, length) for _ in range(int(cycles))],
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
) -> optax.GradientTransformation:
    """Adam / AdamW (PyTorch's defaults: betas 0.9/0.999, eps 1e-8) or SGD (momentum b1 when > 0). Clipping is the
    step's job (it computes the gradient norm anyway)."""
    if name == "adamw":
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if name == "adam":
        return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=b1 or None)
    raise UserError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
