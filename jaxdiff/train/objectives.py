"""The standard denoising objective for the UNet (DDPM, epsilon / v-prediction, optional min-SNR-gamma weighting)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from jaxdiff.sampling.schedulers import common


def alphas_cumprod(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012):
    """float32 [T], exactly as diffusers' DDPMScheduler computes it."""
    return common.make_alphas_cumprod(
        dict(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
        )
    )


def snr(acp: jax.Array, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at integer timesteps t [B]."""
    a = jnp.asarray(acp, jnp.float32)[t]
    return a / (1.0 - a)


def min_snr_weight(snr_t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv 2303.09556, eq. 9 and its v-prediction form):
    min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v targets."""
    clipped = jnp.minimum(snr_t, gamma)
    return clipped / (snr_t + 1.0) if prediction_type == "v_prediction" else clipped / snr_t


_inside_block = threading.local()


def remat_blocks(apply_fn: Callable, block_types: tuple[type, ...]) -> Callable:
    """`apply_fn` with every `__call__` of a module of `block_types` under flax's lifted remat (nn.remat):
    the block's activations are recomputed in the backward pass instead of stored (memory for ~1/3 more compute)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (
            context.method_name != "__call__"
            or not isinstance(module, block_types)
            or getattr(_inside_block, "on", False)
        ):
            return next_fun(*args, **kwargs)

        # Python constants among the positional arguments (a layer index, None) stay static: remat would trace them.
        static = {i: a for i, a in enumerate(args) if a is None or isinstance(a, (bool, int, float, str))}
        traced = [a for i, a in enumerate(args) if i not in static]

        def body(mdl, *a, **kw):
            it = iter(a)
            full = [static[i] if i in static else next(it) for i in range(len(args))]
            _inside_block.on = True
            try:
                return type(mdl).__call__(mdl, *full, **kw)
            finally:
                _inside_block.on = False

        return nn.remat(body)(module, *traced, **kwargs)

    def wrapped(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return apply_fn(*args, **kwargs)

    return wrapped


def unet_block_types() -> tuple[type, ...]:
    from jaxdiff.models import unet_blocks

    return (unet_blocks.DownBlock, unet_blocks.MidBlockCrossAttn, unet_blocks.UpBlock)


# Batch features passed to the UNet as `added_cond` when present (SDXL's text_time conditioning).
ADDED_COND_KEYS = ("text_embeds", "time_ids")


def denoising_loss(apply_fn: Callable, cfg, *, model_key: str | None = None) -> Callable:
    """loss_fn(params, frozen, batch, rng) -> (loss, aux) for a UNet apply(params, x_t, t, context).

    x0 = batch[cfg.input_key] * cfg.input_scale [B, H, W, C]; context = batch[cfg.context_key] [B, L, D];
    t ~ U{0..T-1}, noise ~ N(0, I), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM, Ho et al. 2020 eq. 4);
    target: noise (epsilon) or v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022);
    loss = mean over the batch of w_t * mean((pred - target)^2), w_t = 1 or min-SNR-gamma.
    `model_key`: the UNet params live under params[model_key] (None: params are the UNet's). A batch holding
    "text_embeds" [B, P] and "time_ids" [B, 6] passes them as the UNet's added_cond (SDXL).
    """
    acp = alphas_cumprod(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end)
    prediction_type, gamma = cfg.prediction_type, float(cfg.snr_gamma)
    num_t = int(cfg.num_train_timesteps)

    def loss_fn(params, frozen, batch, rng):
        del frozen
        unet_params = params if model_key is None else params[model_key]
        x0 = batch[cfg.input_key].astype(jnp.float32) * cfg.input_scale
        context = batch[cfg.context_key]
        b = x0.shape[0]
        noise_rng, t_rng = jax.random.split(rng)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        t = jax.random.randint(t_rng, (b,), 0, num_t)
        x_t = common.add_noise(acp, x0, noise, t)
        target = noise if prediction_type == "epsilon" else common.velocity(acp, x0, noise, t)
        added = {k: batch[k].astype(jnp.float32) for k in ADDED_COND_KEYS if k in batch}
        pred = apply_fn(unet_params, x_t, t.astype(jnp.float32), context, *([added] if added else []))
        pred = pred.astype(jnp.float32)
        mse = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x0.ndim)))
        if gamma > 0:
            weights = min_snr_weight(snr(acp, t), gamma, prediction_type)
            loss = jnp.mean(weights * mse)
        else:
            loss = jnp.mean(mse)
        return loss, {"mse": jnp.mean(mse)}

    return loss_fn


def image_caption_loss(apply_fn: Callable, cfg, encode: Callable) -> Callable:
    """`denoising_loss` on images and caption ids: loss_fn(params, frozen, batch, rng) with
    (encode_rng, loss_rng) = split(rng); latents, context = encode(frozen, batch, encode_rng) (the frozen VAE and
    text encoder, see train/frozen.py); then exactly denoising_loss(params, -, {latents, context}, loss_rng)."""
    latents_cfg = mlc.ConfigDict(cfg.to_dict())
    latents_cfg.update(input_key="latents", context_key="encoder_hidden_states", input_scale=1.0)
    inner = denoising_loss(apply_fn, latents_cfg)

    def loss_fn(params, frozen, batch, rng):
        encode_rng, loss_rng = jax.random.split(rng)
        latents, context = encode(frozen, batch, encode_rng)
        return inner(params, None, {"latents": latents, "encoder_hidden_states": context}, loss_rng)

    return loss_fn


OBJECTIVES: dict[str, Callable[..., Any]] = {"denoising": denoising_loss}
