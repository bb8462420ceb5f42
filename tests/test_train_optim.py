"""optim: the final-value fraction of the schedules and the weight-decay mask (the shapes stages' optimiser)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.errors import UserError
from jaxdiff.train import optim


def test_cosine_to_a_fraction_is_optax_warmup_cosine_and_the_default_still_decays_to_zero():
    steps = np.arange(0, 121)
    ours = optim.schedule(1e-3, 120, kind="cosine", warmup_steps=20, final_fraction=0.1)
    ref = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 20, 120, 1e-4)
    np.testing.assert_allclose([ours(s) for s in steps], [ref(s) for s in steps], rtol=1e-6, atol=1e-12)
    assert float(ours(120)) == pytest.approx(1e-4)
    assert float(optim.schedule(1e-3, 120, kind="cosine", warmup_steps=20)(120)) == pytest.approx(0.0, abs=1e-12)
    assert float(optim.schedule(1e-3, 100, kind="linear", final_fraction=0.25)(100)) == pytest.approx(2.5e-4)
    with pytest.raises(UserError):
        optim.schedule(1e-3, 100, kind="cosine", final_fraction=1.5)


def test_kernels_only_decays_kernels_and_leaves_biases_norms_and_embeddings():
    params = {
        "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        "norm": {"scale": jnp.ones(2)},
        "embed": {"embedding": jnp.ones((3, 2))},
    }
    tx = optim.optimizer("adamw", 0.1, weight_decay=0.5, decay_mask=optim.kernels_only)
    zeros = {k: {n: jnp.zeros_like(v) for n, v in d.items()} for k, d in params.items()}
    updates, _ = tx.update(zeros, tx.init(params), params)
    moved = {f"{k}/{n}": bool(jnp.any(v != 0)) for k, d in updates.items() for n, v in d.items()}
    assert moved == {"dense/kernel": True, "dense/bias": False, "norm/scale": False, "embed/embedding": False}
    # Without a mask (the default) every leaf decays, as before.
    plain = optim.optimizer("adamw", 0.1, weight_decay=0.5)
    updates, _ = plain.update(zeros, plain.init(params), params)
    assert all(bool(jnp.all(v != 0)) for d in updates.values() for v in d.values())
