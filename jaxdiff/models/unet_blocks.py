"""Down, mid and up blocks of UNet2DConditionModel (with or without cross-attention transformers)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from jaxdiff.models.transformer import Transformer2DModel


class _BlockOptions(nn.Module):
    """Fields shared by every UNet block."""

    out_channels: int
    num_layers: int
    groups: int = 32
    eps: float = 1e-5
    cross_attention: bool = False  # CrossAttn* blocks carry `attentions_<i>`
    heads: int = 8
    transformer_layers: int = 1
    linear_projection: bool = False
    upcast: bool = False
    only_cross_attention: bool = False
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None  # the platform compiled for (None: the host's default backend)
    # T-GATE: (self-attention mode, cross-attention mode), see transformer.ATTN_CACHE_MODES; None computes both.
    attn_cache_mode: tuple | None = None
    scan_layers: bool = False  # transformer stacks as one lax.scan (Transformer2DModel.scan_layers)

    def resnet(self, i):
        return ResnetBlock2D(
            self.out_channels, self.groups, self.eps, dtype=self.dtype, platform=self.platform, name=f"resnets_{i}"
        )

    def transformer(self, i):
        return Transformer2DModel(
            self.heads,
            self.out_channels // self.heads,
            self.transformer_layers,
            self.groups,
            self.linear_projection,
            self.upcast,
            self.only_cross_attention,
            self.attention,
            self.dtype,
            self.platform,
            self.attn_cache_mode,
            self.scan_layers,
            name=f"attentions_{i}",
        )


class DownBlock(_BlockOptions):
    """DownBlock2D / CrossAttnDownBlock2D: returns (hidden, skips) with one skip per layer and downsampler.

    `units`: compute only the first `units` of its layers-then-downsampler (DeepCache's shallow branch)."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context, units: int | None = None):
        units = self.num_units if units is None else units
        skips = []
        for i in range(min(units, self.num_layers)):
            x = self.resnet(i)(x, temb)
            if self.cross_attention:
                x = self.transformer(i)(x, context)
            skips.append(x)
        if self.add_downsample and units > self.num_layers:
            x = Downsample2D(self.out_channels, dtype=self.dtype, platform=self.platform, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips

    @property
    def num_units(self) -> int:
        """Skips it produces: one per layer, one for the downsampler."""
        return self.num_layers + int(self.add_downsample)


class MidBlockCrossAttn(_BlockOptions):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) per layer."""

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet(0)(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(i)(x, context)
            x = self.resnet(i + 1)(x, temb)
        return x


class UpBlock(_BlockOptions):
    """UpBlock2D / CrossAttnUpBlock2D: each layer concatenates the matching down-path skip first (layer i takes
    skips[-1 - i]).

    `start`: enter at layer `start` with `x` (DeepCache's shallow branch); `capture`: also return the hidden state
    entering layer `capture`, as (out, captured)."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, start: int = 0, capture: int | None = None):
        captured = None
        for i in range(start, self.num_layers):
            if i == capture:
                captured = x
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = self.resnet(i)(x, temb)
            if self.cross_attention:
                x = self.transformer(i)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, platform=self.platform, name="upsamplers_0")(x)
        return x if capture is None else (x, captured)
