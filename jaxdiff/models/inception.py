"""pytorch-fid's FID Inception-v3 (the TF 2015 graph: FIDInception blocks, 1008 logits) as a Flax module on NHWC."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.model import Architecture

# Logical axis names as in jaxdiff.models.layers; own layers here because Inception needs rectangular kernels
# (1x7, 7x1, 1x3, 3x1) padded per axis, and BatchNorm with running statistics kept among the params.
CONV_IN, CONV_OUT, NORM, EMBED, VOCAB = "conv_in", "conv_out", "norm", "embed", "vocab"
BN_EPS = 1e-3  # pytorch-fid's BasicConv2d: BatchNorm2d(eps=0.001), as the TF graph
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the TF 2015 graph's 1001 ImageNet classes padded to 1008
FID_CONFIG = {"_class_name": "FIDInceptionV3", "num_classes": NUM_CLASSES}
# pytorch-fid's `--dims` choices -> the output holding those features (its blocks 0-3, spatially averaged)
DIMS = {64: "block0", 192: "block1", 768: "block2", 2048: "pool3"}


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _precision(dtype):
    # float32 stays float32 on GPU/TPU too (their default matmul precision is TF32/bf16-like).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (inference: running mean/var are params) -> ReLU, named `conv` and `bn` as torch."""

    features: int
    kernel_size: int | Sequence[int] = 1
    stride: int = 1
    padding: int | Sequence[int] = 0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = Conv(self.features, _pair(self.kernel_size), self.stride, _pair(self.padding), self.dtype, name="conv")(x)
        return jax.nn.relu(BatchNorm(name="bn", dtype=self.dtype)(y))


class Conv(nn.Module):
    """Bias-free NHWC convolution with a rectangular kernel [kh, kw, in, out] and symmetric (ph, pw) zero padding."""

    features: int
    kernel_size: tuple[int, int]
    stride: int
    padding: tuple[int, int]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, CONV_IN, CONV_OUT)),
            (*self.kernel_size, x.shape[-1], self.features),
            jnp.float32,
        )
        (ph, pw), s = self.padding, self.stride
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (s, s),
            ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=_precision(self.dtype),
        )


class BatchNorm(nn.Module):
    """Inference BatchNorm: y = (x - mean) / sqrt(var + eps) * scale + bias, folded into one scale and shift."""

    epsilon: float = BN_EPS
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]

        def param(name, init):
            return self.param(name, nn.with_logical_partitioning(init, (NORM,)), (c,), jnp.float32)

        scale, bias = param("scale", nn.initializers.ones_init()), param("bias", nn.initializers.zeros_init())
        mean, var = param("mean", nn.initializers.zeros_init()), param("var", nn.initializers.ones_init())
        alpha = scale * jax.lax.rsqrt(var + self.epsilon)
        return (x * alpha.astype(self.dtype) + (bias - mean * alpha).astype(self.dtype)).astype(self.dtype)


def max_pool(x, stride: int, padding: int = 0):
    """3x3 max pool (torch MaxPool2d / max_pool2d: padded cells never win)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x):
    """avg_pool2d(3, stride 1, padding 1, count_include_pad=False): the TF graph divides by the cells inside the image
    (torchvision's InceptionA/C/E count the padded zeros; pytorch-fid's FID blocks do not)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return total / count


class FIDInceptionA(nn.Module):
    pool_features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, p, name: BasicConv2d(f, k, 1, p, self.dtype, name=name)  # noqa: E731
        b1 = conv(64, 1, 0, "branch1x1")(x)
        b5 = conv(64, 5, 2, "branch5x5_2")(conv(48, 1, 0, "branch5x5_1")(x))
        b3 = conv(64, 1, 0, "branch3x3dbl_1")(x)
        b3 = conv(96, 3, 1, "branch3x3dbl_3")(conv(96, 3, 1, "branch3x3dbl_2")(b3))
        bp = conv(self.pool_features, 1, 0, "branch_pool")(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision's InceptionB (Mixed_6a), unchanged by pytorch-fid."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s, p, name: BasicConv2d(f, k, s, p, self.dtype, name=name)  # noqa: E731
        b3 = conv(384, 3, 2, 0, "branch3x3")(x)
        bd = conv(96, 3, 1, 1, "branch3x3dbl_2")(conv(64, 1, 1, 0, "branch3x3dbl_1")(x))
        bd = conv(96, 3, 2, 0, "branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, max_pool(x, 2)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        conv = lambda f, k, p, name: BasicConv2d(f, k, 1, p, self.dtype, name=name)  # noqa: E731
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of a 1x7 and a 7x1 conv
        b1 = conv(192, 1, 0, "branch1x1")(x)
        b7 = conv(c7, 1, 0, "branch7x7_1")(x)
        b7 = conv(c7, *row, "branch7x7_2")(b7)
        b7 = conv(192, *col, "branch7x7_3")(b7)
        bd = conv(c7, 1, 0, "branch7x7dbl_1")(x)
        bd = conv(c7, *col, "branch7x7dbl_2")(bd)
        bd = conv(c7, *row, "branch7x7dbl_3")(bd)
        bd = conv(c7, *col, "branch7x7dbl_4")(bd)
        bd = conv(192, *row, "branch7x7dbl_5")(bd)
        bp = conv(192, 1, 0, "branch_pool")(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision's InceptionD (Mixed_7a), unchanged by pytorch-fid."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s, p, name: BasicConv2d(f, k, s, p, self.dtype, name=name)  # noqa: E731
        b3 = conv(320, 3, 2, 0, "branch3x3_2")(conv(192, 1, 1, 0, "branch3x3_1")(x))
        b7 = conv(192, 1, 1, 0, "branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), 1, (0, 3), "branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), 1, (3, 0), "branch7x7x3_3")(b7)
        b7 = conv(192, 3, 2, 0, "branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class FIDInceptionE(nn.Module):
    """FIDInceptionE_1 (pool="avg": average pool without the padded cells) or FIDInceptionE_2 (pool="max": the TF
    graph's last block max-pools its pooling branch)."""

    pool: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, p, name: BasicConv2d(f, k, 1, p, self.dtype, name=name)  # noqa: E731
        b1 = conv(320, 1, 0, "branch1x1")(x)
        b3 = conv(384, 1, 0, "branch3x3_1")(x)
        b3 = jnp.concatenate(
            [conv(384, (1, 3), (0, 1), "branch3x3_2a")(b3), conv(384, (3, 1), (1, 0), "branch3x3_2b")(b3)], axis=-1
        )
        bd = conv(384, 3, 1, "branch3x3dbl_2")(conv(448, 1, 0, "branch3x3dbl_1")(x))
        bd = jnp.concatenate(
            [conv(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd), conv(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd)],
            axis=-1,
        )
        pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 1, 1)
        bp = conv(192, 1, 0, "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's `fid_inception_v3()` network on NHWC images already resized to 299x299 and scaled to [-1, 1]
    (`jaxdiff.metrics.fid` does that per preprocessing mode).

    Returns {"pool3": [B, 2048], "logits": [B, 1008] (fc with bias, as torchvision's forward), "logits_unbiased":
    [B, 1008] (pool3 @ W, no bias: torch-fidelity's input to IS), "block0"/"block1"/"block2": [B, 64/192/768]
    (pytorch-fid's lower `--dims`, spatially averaged)}. `platform` is accepted for `Model.for_platform`.
    """

    num_classes: int = NUM_CLASSES
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        spatial_mean = lambda t: jnp.mean(t.astype(jnp.float32), axis=(1, 2))  # noqa: E731
        x = BasicConv2d(32, 3, 2, 0, d, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, 1, 0, d, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, 1, 1, d, name="Conv2d_2b_3x3")(x)
        block0 = x = max_pool(x, 2)
        x = BasicConv2d(80, 1, 1, 0, d, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, 1, 0, d, name="Conv2d_4a_3x3")(x)
        block1 = x = max_pool(x, 2)
        x = FIDInceptionA(32, d, name="Mixed_5b")(x)
        x = FIDInceptionA(64, d, name="Mixed_5c")(x)
        x = FIDInceptionA(64, d, name="Mixed_5d")(x)
        x = InceptionB(d, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(c7, d, name=name)(x)
        block2 = x
        x = InceptionD(d, name="Mixed_7a")(x)
        x = FIDInceptionE("avg", d, name="Mixed_7b")(x)
        x = FIDInceptionE("max", d, name="Mixed_7c")(x)
        pool3 = spatial_mean(x)
        logits_unbiased, logits = Head(self.num_classes, name="fc")(pool3)
        return {
            "pool3": pool3,
            "logits": logits,
            "logits_unbiased": logits_unbiased,
            "block0": spatial_mean(block0),
            "block1": spatial_mean(block1),
            "block2": spatial_mean(block2),
        }


class Head(nn.Module):
    """torch `fc` (Linear 2048 -> 1008) in float32; returns (pool3 @ W, pool3 @ W + b)."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), (EMBED, VOCAB)),
            (x.shape[-1], self.features),
            jnp.float32,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (VOCAB,)), (self.features,), jnp.float32
        )
        unbiased = jnp.dot(x.astype(jnp.float32), kernel, precision=jax.lax.Precision.HIGHEST)
        return unbiased, unbiased + bias


def build(config: dict, dtype=jnp.float32, attention: str = "auto", platform: str | None = None) -> FIDInceptionV3:
    del attention  # no attention in Inception
    return FIDInceptionV3(num_classes=config.get("num_classes", NUM_CLASSES), dtype=dtype, platform=platform)


def example_inputs(config: dict) -> tuple:
    """The smallest input the stem and the stride-2 reductions accept (params do not depend on the image size)."""
    return (jnp.zeros((1, 75, 75, 3), jnp.float32),)


ARCHITECTURES = {
    "FIDInceptionV3": Architecture(name="FIDInceptionV3", kind="inception", build=build, example_inputs=example_inputs)
}
