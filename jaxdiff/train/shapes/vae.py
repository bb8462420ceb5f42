"""Stage vae: a diffusers AutoencoderKL, 32x32x3 -> 8x8x4 (L1 + L2 reconstruction, a small KL); then the train
set's posteriors (for the decoder stage) and scaling_factor = 1 / std(latent means)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxdiff.convert import checkpoint
from jaxdiff.models import registry
from jaxdiff.models.model import create
from jaxdiff.train.shapes import fit
from jaxdiff.train.shapes.common import Run, to_images
from jaxdiff.train.shapes.models import vae_config


def reconstruction(err: jax.Array) -> jax.Array:
    """L2 + L1 per image, summed over pixels, averaged over the batch (the vae and decoder stages' loss)."""
    return (jnp.square(err) + jnp.abs(err)).sum((1, 2, 3)).mean()


def reconstruction_mse(run: Run, vae, params) -> float:
    """Reconstruction MSE (from the posterior means) on the first 500 test images."""
    x = to_images(run.data("test")["images"][:500]) * 2 - 1
    rec = jax.jit(lambda p, x: vae.decode(p, vae.encode(p, x)[0]))(params, x)
    return float(jnp.mean(jnp.square(rec - x)))


def stage(run: Run) -> dict:
    data = run.data("train")
    cfg = vae_config(run.tiny)
    seed = run.opts.seed + 1
    model = create(registry.architecture_for(cfg), cfg, abstract=False, seed=seed)
    batch_size = run.hp("vae", "batch")
    kl_weight = run.hp("vae", "kl_weight")

    def loss_fn(params, frozen, batch, rng):
        p, x = params["vae"], batch["x"]
        mean, logvar = model.encode(p, x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        err = model.decode(p, z) - x
        kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar).sum((1, 2, 3)).mean()
        return reconstruction(err) + kl_weight * kl, {"mse": jnp.square(err).mean(), "kl": kl}

    def batch_fn(rng):
        return {"x": to_images(data["images"][rng.integers(0, len(data["images"]), batch_size)]) * 2 - 1}

    params, info = fit.train_one(
        run,
        "vae",
        "vae",
        loss_fn,
        model.params,
        batch_fn,
        seed=seed,
        config={"vae": cfg, "kl_weight": kl_weight, "examples": len(data["images"])},
    )

    # Latents of the whole train set (for the decoder stage) and the scaling factor.
    encode = jax.jit(lambda p, x: model.encode(p, x))
    means, logvars = [], []
    for i in tqdm(range(0, len(data["images"]), 500), desc="vae latents", mininterval=5):
        m, lv = encode(params, to_images(data["images"][i : i + 500]) * 2 - 1)
        means.append(np.asarray(m))
        logvars.append(np.asarray(lv))
    means, logvars = np.concatenate(means), np.concatenate(logvars)
    scaling = float(1.0 / means.std())
    cfg = {**cfg, "scaling_factor": scaling}
    final = create(registry.architecture_for(cfg), cfg, abstract=True)
    final.params = params
    checkpoint.save_checkpoint(run.dir("vae") / "vae", final, overwrite=True)
    tmp = run.dir("vae") / "latents.tmp.npz"
    np.savez(tmp, mean=means.astype(np.float32), logvar=logvars.astype(np.float32))
    os.replace(tmp, run.dir("vae") / "latents.npz")
    return {
        **info,
        "batch": batch_size,
        "scaling_factor": scaling,
        "latent_std": float(means.std()),
        "posterior_std_mean": float(np.exp(0.5 * logvars).mean()),
        "test_mse": reconstruction_mse(run, model, params),
        "params": final.num_params(),
    }
