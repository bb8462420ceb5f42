"""diffusers' AutoencoderKL (the Stable Diffusion VAE) as a Flax linen module on NHWC images."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.layers import EMBED, HEADS, Conv, Dense, GroupNorm
from jaxdiff.models.model import Architecture
from jaxdiff.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

EPS = 1e-6  # diffusers' VAE uses eps 1e-6 in every GroupNorm (the UNet uses 1e-5)
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp
# The Stable Diffusion VAE's config.json (SD 1.x, 2.x; SDXL's has the same shape and scaling_factor 0.13025).
SD_CONFIG = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels plus residual (diffusers `Attention` from the old VAE block)."""

    groups: int
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, EPS, self.dtype, name="group_norm")(x).reshape(b, h * w, 1, c)
        q, k, v = (Dense(c, axes=(EMBED, HEADS), dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        # diffusers builds this block with upcast_softmax=True; heads = channels // attention_head_dim = 1.
        o = dot_product_attention(q, k, v, upcast=True, implementation=self.attention, platform=self.platform)
        o = Dense(c, axes=(HEADS, EMBED), dtype=self.dtype, name="to_out_0")(o.reshape(b, h * w, c))
        return x.astype(self.dtype) + o.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, (attention, resnet)."""

    groups: int
    add_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, EPS, dtype=self.dtype, platform=self.platform, name="resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.dtype, self.attention, self.platform, name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, EPS, dtype=self.dtype, platform=self.platform, name="resnets_1")(x)


class ResnetStack(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: `num_layers` resnets, then an optional down- or up-sampler."""

    out_channels: int
    num_layers: int
    groups: int
    resample: str | None = None  # "down" | "up" | None
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x):
        common = dict(dtype=self.dtype, platform=self.platform)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, name=f"resnets_{j}", **common)(x)
        if self.resample == "down":
            # The VAE pads only bottom/right before its stride-2 conv (diffusers `downsample_padding=0`).
            x = Downsample2D(self.out_channels, asymmetric_padding=True, name="downsamplers_0", **common)(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, name="upsamplers_0", **common)(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, in] -> moments [B, H/f, W/f, 2 * latent] (f = 2 ** (len(block_out_channels) - 1))."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int
    add_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x):
        chans, platform = self.block_out_channels, self.platform
        h = Conv(chans[0], 3, padding=1, dtype=self.dtype, platform=platform, name="conv_in")(x)
        for i, ch in enumerate(chans):
            resample = "down" if i < len(chans) - 1 else None
            h = ResnetStack(
                ch, self.layers_per_block, self.groups, resample, self.dtype, platform, name=f"down_blocks_{i}"
            )(h)
        h = MidBlock(self.groups, self.add_attention, self.dtype, self.attention, platform, name="mid_block")(h)
        h = nn.silu(GroupNorm(self.groups, EPS, self.dtype, name="conv_norm_out")(h))
        return Conv(2 * self.latent_channels, 3, padding=1, dtype=self.dtype, platform=platform, name="conv_out")(h)


class Decoder(nn.Module):
    """Latents [B, h, w, latent] -> image [B, h*f, w*f, out]; up blocks have one resnet more than down blocks."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    add_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, z):
        chans, platform = tuple(reversed(self.block_out_channels)), self.platform
        h = Conv(chans[0], 3, padding=1, dtype=self.dtype, platform=platform, name="conv_in")(z)
        h = MidBlock(self.groups, self.add_attention, self.dtype, self.attention, platform, name="mid_block")(h)
        for i, ch in enumerate(chans):
            resample = "up" if i < len(chans) - 1 else None
            h = ResnetStack(
                ch, self.layers_per_block + 1, self.groups, resample, self.dtype, platform, name=f"up_blocks_{i}"
            )(h)
        h = nn.silu(GroupNorm(self.groups, EPS, self.dtype, name="conv_norm_out")(h))
        return Conv(self.out_channels, 3, padding=1, dtype=self.dtype, platform=platform, name="conv_out")(h)


class AutoencoderKL(nn.Module):
    """The KL VAE: `encode` -> (mean, logvar), `decode` of unscaled latents, `__call__` = decode(mean) (for init)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None  # the platform compiled for (None: the host's default backend)

    def setup(self):
        common = dict(
            groups=self.norm_num_groups,
            add_attention=self.mid_block_add_attention,
            dtype=self.dtype,
            attention=self.attention,
            platform=self.platform,
        )
        chans, layers = tuple(self.block_out_channels), self.layers_per_block
        self.encoder = Encoder(chans, layers, self.latent_channels, **common)
        self.decoder = Decoder(chans, layers, self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = Conv(2 * self.latent_channels, 1, padding=0, dtype=self.dtype, platform=self.platform)
        if self.use_post_quant_conv:
            self.post_quant_conv = Conv(self.latent_channels, 1, padding=0, dtype=self.dtype, platform=self.platform)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, H, W, in] in [-1, 1] -> (mean, logvar), float32, each [B, H/f, W/f, latent_channels]."""
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        # Latents feed float32 scheduler math, so hand them back in float32 whatever the compute dtype.
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents z [B, h, w, latent_channels] -> image [B, h*f, w*f, out] (float32, about [-1, 1])."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x)[0])


_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


def _check_config(config: dict) -> None:
    chans = list(config.get("block_out_channels", (64,)))
    for key, supported in _BLOCK_TYPES.items():
        types = list(config.get(key, (supported,)))
        if any(t != supported for t in types):
            raise ValueError(f"AutoencoderKL: unsupported {key} {types}; jaxdiff supports only {supported!r}")
        if len(types) != len(chans):
            raise ValueError(f"AutoencoderKL: {key} has {len(types)} entries but block_out_channels has {len(chans)}")
    act = config.get("act_fn", "silu")
    if act not in ("silu", "swish"):  # diffusers maps both names to SiLU
        raise ValueError(f"AutoencoderKL: unsupported act_fn {act!r}; jaxdiff supports only 'silu'")
    groups = config.get("norm_num_groups", 32)
    if any(c % groups for c in chans):
        raise ValueError(f"AutoencoderKL: norm_num_groups {groups} does not divide block_out_channels {chans}")


def build(config: dict, dtype=jnp.float32, attention: str = "auto", platform: str | None = None) -> AutoencoderKL:
    """The module for a diffusers AutoencoderKL config.json dict."""
    _check_config(config)
    if config.get("force_upcast", True) and jnp.dtype(dtype) == jnp.float16:
        # diffusers' force_upcast: this VAE overflows in float16 (bfloat16 has float32's range and is kept).
        dtype = jnp.float32
    return AutoencoderKL(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        block_out_channels=tuple(config.get("block_out_channels", (64,))),
        layers_per_block=config.get("layers_per_block", 1),
        latent_channels=config.get("latent_channels", 4),
        norm_num_groups=config.get("norm_num_groups", 32),
        use_quant_conv=config.get("use_quant_conv", True),
        use_post_quant_conv=config.get("use_post_quant_conv", True),
        mid_block_add_attention=config.get("mid_block_add_attention", True),
        dtype=dtype,
        attention=attention,
        platform=platform,
    )


def example_inputs(config: dict) -> tuple:
    """The smallest image the encoder accepts: params do not depend on spatial size, so init stays cheap."""
    size = 2 ** (len(config.get("block_out_channels", (64,))) - 1)
    return (jnp.zeros((1, size, size, config.get("in_channels", 3)), jnp.float32),)


ARCHITECTURES = {
    "AutoencoderKL": Architecture(
        name="AutoencoderKL",
        kind="vae",
        build=build,
        example_inputs=example_inputs,
    )
}
