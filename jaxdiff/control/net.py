"""The ControlNet a run starts from: the frozen UNet's down path and mid block copied, zero convolutions zeroed."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import UserError
from jaxdiff.models import controlnet as controlnet_lib
from jaxdiff.models.model import Model, create

# Where diffusers' ControlNetModel applies zero_module: the conditioning embedding's last conv and every 1x1 conv
# whose output reaches the UNet, so a fresh ControlNet leaves the UNet's prediction unchanged.
ZEROED = ("controlnet_down_blocks_", "controlnet_mid_block")


def zero_convs(params: dict) -> dict:
    """`params` with the zero convolutions (ZEROED and controlnet_cond_embedding/conv_out) set to zeros (leaves may
    be arrays or ShapeDtypeStructs)."""
    zeros = lambda tree: jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), tree)  # noqa: E731
    out = {k: zeros(v) if k.startswith(ZEROED) else v for k, v in params.items()}
    embedding = dict(out["controlnet_cond_embedding"])
    embedding["conv_out"] = zeros(embedding["conv_out"])
    out["controlnet_cond_embedding"] = embedding
    return out


def from_unet(unet: Model, vae_scale_factor: int, conditioning_embedding_out_channels, seed: int = 0) -> Model:
    """A ControlNet for `unet` (diffusers' ControlNetModel.from_unet): its config, the UNet's conv_in, embeddings,
    down blocks and mid block, a freshly initialised conditioning embedding whose condition image is the output
    image's size (a UserError naming the right length otherwise), zero convolutions."""
    channels = tuple(int(c) for c in conditioning_embedding_out_channels)
    config = controlnet_lib.config_from_unet(unet.config, conditioning_embedding_out_channels=channels)
    factor = controlnet_lib.cond_factor(config)
    if factor != vae_scale_factor:
        want = vae_scale_factor.bit_length()
        raise UserError(
            f"controlnet.conditioning_embedding_out_channels={channels} makes the condition image {factor}x the "
            f"latents, but the images are {vae_scale_factor}x them (the VAE's factor): give {want} channel counts"
        )
    controlnet_lib.check_compatible(config, unet.config)
    architecture = controlnet_lib.ARCHITECTURES["ControlNetModel"]
    dtype = unet.module.dtype
    model = create(architecture, config, abstract=True, dtype=dtype, seed=seed, platform=unet.platform)
    # Only the conditioning embedding is initialised here (everything else is copied or zero): a small program.
    cfg = controlnet_lib.resolved_config(config)
    embedding = controlnet_lib.ControlNetConditioningEmbedding(
        cfg["block_out_channels"][0], cfg["conditioning_embedding_out_channels"], dtype=dtype, platform=unet.platform
    )
    cond = jnp.zeros((1, factor, factor, cfg["conditioning_channels"]), jnp.float32)
    fresh = jax.jit(lambda key: nn.unbox(embedding.init(key, cond)["params"]))(jax.random.PRNGKey(seed))
    params = {**model.params, "controlnet_cond_embedding": fresh}
    params = zero_convs(controlnet_lib.params_from_unet(params, unet.params))
    expected = jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), model.params)
    got = jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), params)
    if got != expected:
        raise UserError("the UNet's params do not have the shapes its config gives this ControlNet")
    return dataclasses.replace(model, params=params)
