"""The ControlNet objective: the frozen UNet's denoising loss with the trained ControlNet's residuals added."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import ml_collections as mlc

from jaxdiff.models.model import Model
from jaxdiff.train import objectives


def denoising_config(scheduler_config: dict, snr_gamma: float = 0.0) -> mlc.ConfigDict:
    """The noise schedule and target of the model's scheduler (what its UNet was trained on) for `denoising_loss`."""
    s = scheduler_config
    return mlc.ConfigDict(
        dict(
            num_train_timesteps=int(s.get("num_train_timesteps", 1000)),
            beta_schedule=str(s.get("beta_schedule", "scaled_linear")),
            beta_start=float(s.get("beta_start", 0.00085)),
            beta_end=float(s.get("beta_end", 0.012)),
            prediction_type=str(s.get("prediction_type", "epsilon")),
            snr_gamma=float(snr_gamma),
        )
    )


def make_loss(controlnet: Model, unet: Model, encode: Callable, cfg: mlc.ConfigDict) -> Callable:
    """loss_fn(params {"controlnet"}, frozen {"unet", "vae", "text_encoder"}, batch, rng) -> (loss, aux).

    `objectives.image_caption_loss` (frozen VAE latents and text context from `encode`, caption dropout, t ~ U{0..T-1},
    epsilon or v target, optional min-SNR-gamma) of the UNet called with the ControlNet's down and mid residuals;
    the ControlNet sees the same noisy latents, timesteps and context, and batch["cond"] (uint8 [B, S, S, 3]) in
    [0, 1] as the sampling pipeline feeds it."""

    def loss_fn(params, frozen, batch, rng):
        cond = batch["cond"].astype(jnp.float32) / 255.0

        def apply(p, x_t, t, context, added=None):
            down, mid = controlnet.apply(p["controlnet"], x_t, t, context, cond, added)
            return unet.apply(
                frozen["unet"],
                x_t,
                t,
                context,
                added,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            )

        return objectives.image_caption_loss(apply, cfg, encode)(params, frozen, batch, rng)

    return loss_fn
