"""ResNet blocks, down- and up-samplers shared by the UNet and the VAE (diffusers `resnet.py` semantics)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.layers import CONV_OUT, EMBED, Conv, Dense, GroupNorm, upsample_nearest_2x


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, optional time-embedding add, 1x1 `conv_shortcut` when channels change."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None  # the platform compiled for (None: the host's default backend)

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name="norm1")(x))
        h = Conv(self.out_channels, 3, padding=1, dtype=self.dtype, platform=self.platform, name="conv1")(h)
        if temb is not None:
            t = Dense(self.out_channels, axes=(EMBED, CONV_OUT), dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name="norm2")(h))
        h = Conv(self.out_channels, 3, padding=1, dtype=self.dtype, platform=self.platform, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, padding=0, dtype=self.dtype, platform=self.platform, name="conv_shortcut")(x)
        out = x.astype(self.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (`conv`). UNet pads 1 on every side; the VAE pads (0, 1) bottom/right only."""

    out_channels: int
    asymmetric_padding: bool = False
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x):
        padding = ((0, 1), (0, 1)) if self.asymmetric_padding else 1
        return Conv(
            self.out_channels, 3, stride=2, padding=padding, dtype=self.dtype, platform=self.platform, name="conv"
        )(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (`conv`)."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x):
        conv = Conv(self.out_channels, 3, padding=1, dtype=self.dtype, platform=self.platform, name="conv")
        return conv(upsample_nearest_2x(x))
