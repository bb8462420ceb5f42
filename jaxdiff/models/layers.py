"""Flax building blocks (Dense, Conv, norms, embeddings) whose params carry logical axis names."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff import platforms

# Logical axis names used on parameters; `jaxdiff.sharding` maps them onto mesh axes.
EMBED = "embed"  # model width (dense inputs/outputs, residual stream)
HEADS = "heads"  # attention projection outputs (heads * head_dim)
MLP = "mlp"  # feed-forward hidden width
VOCAB = "vocab"  # token / position tables
CONV_IN = "conv_in"  # convolution input channels
CONV_OUT = "conv_out"  # convolution output channels
NORM = "norm"  # norm scales and biases
KERNEL_SPATIAL = None  # conv kernel height / width: never sharded


def _partitioned(init, axes):
    return nn.with_logical_partitioning(init, tuple(axes))


class Dense(nn.Module):
    """Dense layer: kernel [in, out] and bias [out] in float32, logical axes `axes` = (in, out)."""

    features: int
    use_bias: bool = True
    axes: tuple = (EMBED, MLP)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            _partitioned(nn.initializers.lecun_normal(), self.axes),
            (x.shape[-1], self.features),
            jnp.float32,
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), precision=_precision(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias", _partitioned(nn.initializers.zeros_init(), (self.axes[1],)), (self.features,), jnp.float32
            )
            y = y + bias.astype(self.dtype)
        return y


def _precision(dtype):
    # Full float32 matmuls when computing in float32 (TPU/GPU default precision is bf16/tf32-like).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class Conv(nn.Module):
    """2-D convolution on NHWC with params kernel [kh, kw, in, out] and bias [out].

    `padding` is either an int (symmetric) or explicit ((top, bottom), (left, right)). `platform` is the platform
    the program is compiled for (None: the host's default backend); it picks the formulation (see `conv2d`).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | Sequence[tuple[int, int]] = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            _partitioned(nn.initializers.lecun_normal(), (KERNEL_SPATIAL, KERNEL_SPATIAL, CONV_IN, CONV_OUT)),
            (k, k, x.shape[-1], self.features),
            jnp.float32,
        )
        pad = self.padding
        if isinstance(pad, int):
            pad = ((pad, pad), (pad, pad))
        y = conv2d(
            x.astype(self.dtype), kernel.astype(self.dtype), self.stride, tuple(map(tuple, pad)), platform=self.platform
        )
        if self.use_bias:
            bias = self.param(
                "bias", _partitioned(nn.initializers.zeros_init(), (CONV_OUT,)), (self.features,), jnp.float32
            )
            y = y + bias.astype(self.dtype)
        return y


# On XLA:CPU a 3x3 convolution over few pixels and many channels runs 1.2-2.5x faster forward and ~3x
# faster backward as im2col + one matmul than as a native convolution; at larger images the native
# convolution wins. Accelerators always use the native convolution (cuDNN / TPU MXU).
IM2COL_MAX_PIXELS = 256


def use_im2col(output_pixels: int, platform: str | None = None) -> bool:
    """Whether `conv2d` forms a 3x3 convolution with `output_pixels` output pixels as im2col + matmul."""
    return platforms.resolve(platform) == "cpu" and output_pixels <= IM2COL_MAX_PIXELS


def conv2d(x, kernel, stride: int = 1, padding=((1, 1), (1, 1)), im2col: bool | None = None, platform=None):
    """NHWC x HWIO convolution; `im2col=None` picks the faster formulation for the shape on `platform`, the
    platform the program is compiled for (None: the host's default backend)."""
    kh, kw, cin, cout = kernel.shape
    precision = _precision(x.dtype)
    if kh == kw == 1 and stride == 1 and padding == ((0, 0), (0, 0)):
        return jnp.dot(x, kernel[0, 0], precision=precision)  # a 1x1 convolution is a matmul
    (pt, pb), (pl, pr) = padding
    ho = (x.shape[1] + pt + pb - kh) // stride + 1
    wo = (x.shape[2] + pl + pr - kw) // stride + 1
    if im2col is None:
        im2col = use_im2col(ho * wo, platform)
    if not im2col:
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
        )
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    cols = jnp.concatenate(
        [
            xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
            for i in range(kh)
            for j in range(kw)
        ],
        axis=-1,
    )
    return jnp.dot(cols, kernel.reshape(kh * kw * cin, cout), precision=precision)


class GroupNorm(nn.Module):
    """GroupNorm over the channel (last) axis, statistics in float32 (two-pass variance, like PyTorch)."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", _partitioned(nn.initializers.ones_init(), (NORM,)), (c,), jnp.float32)
        bias = self.param("bias", _partitioned(nn.initializers.zeros_init(), (NORM,)), (c,), jnp.float32)
        shape = x.shape
        xf = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, c // self.num_groups)
        mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(shape)
        return (y * scale + bias).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics in float32."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", _partitioned(nn.initializers.ones_init(), (NORM,)), (c,), jnp.float32)
        bias = self.param("bias", _partitioned(nn.initializers.zeros_init(), (NORM,)), (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale + bias).astype(self.dtype)


class Embed(nn.Module):
    """Lookup table [num_embeddings, features]."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        table = self.param(
            "embedding",
            _partitioned(nn.initializers.normal(0.02), (VOCAB, EMBED)),
            (self.num_embeddings, self.features),
            jnp.float32,
        )
        return jnp.take(table, ids, axis=0).astype(self.dtype)


def upsample_nearest_2x(x):
    """Nearest-neighbour 2x upsampling of NHWC (same as torch `interpolate(scale_factor=2, mode="nearest")`)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
