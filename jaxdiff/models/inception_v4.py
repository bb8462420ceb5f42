"""Inception-v4 (Szegedy et al. 2016, arXiv:1602.07261) as timm builds it, a Flax classifier on NHWC images."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.inception import BasicConv2d, Head, avg_pool_exclude_pad, max_pool
from jaxdiff.models.model import Architecture

# The flax module tree mirrors timm's module tree name for name: torch `nn.Sequential` members are children named
# "0", "1", ... (e.g. `features.4.branch1.2.conv.weight`), so the state-dict keys are the param paths joined by ".".
# BasicConv2d is timm's ConvNormAct (conv -> BatchNorm -> ReLU) with the same `conv` / `bn` names and the same
# BatchNorm eps (BN_EPS = 1e-3, timm's `norm_eps` default in both networks).
NUM_CLASSES = 1000
NUM_FEATURES = 1536
MIN_INPUT_SIZE = 75  # the smallest square input the stride-2 reductions accept (both networks); timm trains at 299
AVG = "avg"  # in a Sequential: timm's AvgPool2d(3, stride=1, padding=1, count_include_pad=False), which takes an index


class Sequential(nn.Module):
    """A torch `nn.Sequential` of BasicConv2d layers, each given as (features, kernel, stride, padding) or AVG."""

    layers: Sequence
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = avg_pool_exclude_pad(x) if layer == AVG else BasicConv2d(*layer, dtype=self.dtype, name=str(i))(x)
        return x


def _concat(*parts):
    return jnp.concatenate(parts, axis=-1)


# Rectangular (kernel, padding) pairs: 1x7 / 7x1 and 1x3 / 3x1 keep the spatial size.
ROW7, COL7 = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
ROW3, COL3 = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))


class Mixed3a(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _concat(max_pool(x, 2), BasicConv2d(96, 3, 2, 0, self.dtype, name="conv")(x))


class Mixed4a(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        seq = partial(Sequential, dtype=self.dtype)
        b0 = seq([(64, 1, 1, 0), (96, 3, 1, 0)], name="branch0")(x)
        b1 = seq([(64, 1, 1, 0), (64, *ROW7), (64, *COL7), (96, 3, 1, 0)], name="branch1")(x)
        return _concat(b0, b1)


class Mixed5a(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _concat(BasicConv2d(192, 3, 2, 0, self.dtype, name="conv")(x), max_pool(x, 2))


class InceptionA(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        seq = partial(Sequential, dtype=self.dtype)
        b0 = BasicConv2d(96, 1, 1, 0, self.dtype, name="branch0")(x)
        b1 = seq([(64, 1, 1, 0), (96, 3, 1, 1)], name="branch1")(x)
        b2 = seq([(64, 1, 1, 0), (96, 3, 1, 1), (96, 3, 1, 1)], name="branch2")(x)
        b3 = seq([AVG, (96, 1, 1, 0)], name="branch3")(x)
        return _concat(b0, b1, b2, b3)


class ReductionA(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b0 = BasicConv2d(384, 3, 2, 0, self.dtype, name="branch0")(x)
        b1 = Sequential([(192, 1, 1, 0), (224, 3, 1, 1), (256, 3, 2, 0)], self.dtype, name="branch1")(x)
        return _concat(b0, b1, max_pool(x, 2))


class InceptionB(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        seq = partial(Sequential, dtype=self.dtype)
        b0 = BasicConv2d(384, 1, 1, 0, self.dtype, name="branch0")(x)
        b1 = seq([(192, 1, 1, 0), (224, *ROW7), (256, *COL7)], name="branch1")(x)
        b2 = seq([(192, 1, 1, 0), (192, *COL7), (224, *ROW7), (224, *COL7), (256, *ROW7)], name="branch2")(x)
        b3 = seq([AVG, (128, 1, 1, 0)], name="branch3")(x)
        return _concat(b0, b1, b2, b3)


class ReductionB(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        seq = partial(Sequential, dtype=self.dtype)
        b0 = seq([(192, 1, 1, 0), (192, 3, 2, 0)], name="branch0")(x)
        b1 = seq([(256, 1, 1, 0), (256, *ROW7), (320, *COL7), (320, 3, 2, 0)], name="branch1")(x)
        return _concat(b0, b1, max_pool(x, 2))


class InceptionC(nn.Module):
    """Not Sequentials here: timm names these convs `branch1_0`, `branch1_1a`, ... as attributes."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s, p, name: BasicConv2d(f, k, s, p, self.dtype, name=name)  # noqa: E731
        b0 = conv(256, 1, 1, 0, "branch0")(x)
        b1 = conv(384, 1, 1, 0, "branch1_0")(x)
        b1 = _concat(conv(256, *ROW3, "branch1_1a")(b1), conv(256, *COL3, "branch1_1b")(b1))
        b2 = conv(384, 1, 1, 0, "branch2_0")(x)
        b2 = conv(512, *ROW3, "branch2_2")(conv(448, *COL3, "branch2_1")(b2))
        b2 = _concat(conv(256, *ROW3, "branch2_3a")(b2), conv(256, *COL3, "branch2_3b")(b2))
        b3 = Sequential([AVG, (256, 1, 1, 0)], self.dtype, name="branch3")(x)
        return _concat(b0, b1, b2, b3)


class Features(nn.Module):
    """timm's `features` Sequential: stem, 4 x InceptionA, ReductionA, 7 x InceptionB, ReductionB, 3 x InceptionC."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        layers = [
            partial(BasicConv2d, 32, 3, 2, 0),
            partial(BasicConv2d, 32, 3, 1, 0),
            partial(BasicConv2d, 64, 3, 1, 1),
        ]
        layers += [Mixed3a, Mixed4a, Mixed5a, *[InceptionA] * 4, ReductionA, *[InceptionB] * 7, ReductionB]
        layers += [InceptionC] * 3
        for i, layer in enumerate(layers):
            x = layer(dtype=d, name=str(i))(x)
        return x


class InceptionV4(nn.Module):
    """timm's `inception_v4` on NHWC images [B, H, W, 3] (timm: 299x299, Inception mean/std 0.5, i.e. [-1, 1]).

    Returns {"features": [B, 1536] (global average pool, timm's `forward_head(pre_logits=True)`), "logits":
    [B, num_classes] (`last_linear`; absent when num_classes is 0)}. `platform` is accepted for `Model.for_platform`.
    """

    num_classes: int = NUM_CLASSES
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x):
        return classify(Features(self.dtype, name="features")(x), self.num_classes, "last_linear")


def classify(x, num_classes: int, head: str) -> dict:
    """Global average pool [B, H, W, C] -> [B, C] in float32, then timm's Linear classifier named `head`."""
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if not num_classes:
        return {"features": features}
    return {"features": features, "logits": Head(num_classes, name=head)(features)[1]}


def build(config: dict, dtype=jnp.float32, attention: str = "auto", platform: str | None = None) -> InceptionV4:
    del attention  # no attention in Inception
    return InceptionV4(num_classes=config.get("num_classes", NUM_CLASSES), dtype=dtype, platform=platform)


def example_inputs(config: dict) -> tuple:
    """The smallest input the network accepts (params do not depend on the image size)."""
    return (jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32),)


ARCHITECTURES = {
    "InceptionV4": Architecture(name="InceptionV4", kind="inception", build=build, example_inputs=example_inputs)
}
