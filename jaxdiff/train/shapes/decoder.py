"""Stage decoder: the VAE decoder fine-tuned with the encoder frozen (as SD's ft-MSE decoder), from the stored
train-set posteriors: sharper images while the latents, and so the UNet and the scaling factor, stay valid."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import checkpoint
from jaxdiff.train.shapes import fit
from jaxdiff.train.shapes.common import Run, to_images
from jaxdiff.train.shapes.vae import reconstruction, reconstruction_mse

TRAINABLE = r"^(decoder|post_quant_conv)/"  # the rest of the VAE is held fixed inside the "vae" network


def final_vae_path(run: Run) -> Path:
    """The VAE with the fine-tuned decoder when this stage has run, else the VAE as first trained."""
    tuned = run.workdir / "decoder" / "vae"
    return tuned if (tuned / "params.safetensors").is_file() and run.done("decoder") else run.workdir / "vae" / "vae"


def stage(run: Run) -> dict:
    data = run.data("train")
    vae = checkpoint.load_component(run.dir("vae") / "vae")
    lat = np.load(run.dir("vae") / "latents.npz")
    lat_mean, lat_std = lat["mean"], np.exp(0.5 * lat["logvar"])
    batch_size = run.hp("decoder", "batch")

    def loss_fn(params, frozen, batch, rng):
        err = vae.decode(params["vae"], batch["z"]) - batch["x"]
        return reconstruction(err), {"mse": jnp.square(err).mean()}

    def batch_fn(rng):
        idx = rng.integers(0, len(lat_mean), batch_size)
        z = lat_mean[idx] + lat_std[idx] * rng.standard_normal(lat_mean[idx].shape, np.float32)
        return {"z": z, "x": to_images(data["images"][idx]) * 2 - 1}

    params, info = fit.train_one(
        run,
        "decoder",
        "vae",
        loss_fn,
        vae.params,
        batch_fn,
        seed=run.opts.seed + 4,
        config={"vae": vae.config, "examples": len(data["images"])},
        trainable=TRAINABLE,
    )
    vae.params = params
    checkpoint.save_checkpoint(run.dir("decoder") / "vae", vae, overwrite=True)
    return {**info, "batch": batch_size, "test_mse": reconstruction_mse(run, vae, vae.params)}
