"""Personalization objectives: the ε-MSE of DDPM training per example, and DreamBooth's prior-preserving sum."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff.sampling.schedulers import common
from jaxdiff.train.objectives import min_snr_weight, snr


def eps_mse(unet_apply: Callable, alphas_cumprod, latents, context, rng, snr_gamma: float = 0.0) -> jax.Array:
    """Per-example mean ‖ε̂(x_t, t, c) − ε‖² [B] with t ~ U{0..T−1}, x_t = √ā_t x0 + √(1−ā_t) ε (Ho et al. 2020
    eq. 14); `snr_gamma` > 0 weights each example by min(SNR, γ)/SNR (Hang et al. 2023). latents [B, h, w, C]
    (scaled), context [B, L, D]; `unet_apply(x_t, t, context)`."""
    acp = jnp.asarray(alphas_cumprod, jnp.float32)
    b = latents.shape[0]
    noise_rng, t_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, latents.shape, jnp.float32)
    t = jax.random.randint(t_rng, (b,), 0, acp.shape[0])
    x_t = common.add_noise(acp, latents.astype(jnp.float32), noise, t)
    pred = unet_apply(x_t, t.astype(jnp.float32), context).astype(jnp.float32)
    mse = jnp.mean(jnp.square(pred - noise), axis=tuple(range(1, latents.ndim)))
    if snr_gamma > 0:
        mse = mse * min_snr_weight(snr(acp, t), snr_gamma, "epsilon")
    return mse


def prior_preservation(per_example: jax.Array, num_instance: int, prior_weight: float) -> tuple[jax.Array, dict]:
    """DreamBooth (Ruiz et al. 2023, eq. 2; diffusers train_dreambooth.py): the batch is [instance; class] halves,
    L = mean(instance) + λ · mean(class). Returns (L, {"instance", "prior"})."""
    inst = jnp.mean(per_example[:num_instance])
    if per_example.shape[0] == num_instance:
        return inst, {"instance": inst}
    prior = jnp.mean(per_example[num_instance:])
    return inst + prior_weight * prior, {"instance": inst, "prior": prior}
