"""Inception-ResNet-v2 (Szegedy et al. 2016, arXiv:1602.07261) as timm builds it, a Flax classifier on NHWC images."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import layers
from jaxdiff.models.inception import BasicConv2d, max_pool
from jaxdiff.models.inception_v4 import (
    AVG,
    COL3,
    COL7,
    MIN_INPUT_SIZE,
    NUM_CLASSES,
    NUM_FEATURES,
    ROW3,
    ROW7,
    Sequential,
    classify,
)
from jaxdiff.models.model import Architecture

# Module names are timm's (see inception_v4): `repeat.3.branch1.1.conv.weight`, `repeat_1.0.conv2d.bias`, `classif`.


class Mixed5b(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        seq = partial(Sequential, dtype=self.dtype)
        b0 = BasicConv2d(96, 1, 1, 0, self.dtype, name="branch0")(x)
        b1 = seq([(48, 1, 1, 0), (64, 5, 1, 2)], name="branch1")(x)
        b2 = seq([(64, 1, 1, 0), (96, 3, 1, 1), (96, 3, 1, 1)], name="branch2")(x)
        b3 = seq([AVG, (64, 1, 1, 0)], name="branch3")(x)
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class Residual(nn.Module):
    """Block35 / Block17 / Block8: relu(x + scale * conv1x1(concat(branches))), `conv2d` a 1x1 conv with bias back to
    the input width; `relu=False` for the final `block8`."""

    branch0: int  # width of the 1x1 BasicConv2d `branch0`
    branch1: tuple  # layers of the Sequential `branch1` (and `branch2` in Block35)
    branch2: tuple | None
    scale: float
    relu: bool = True
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x):
        seq = partial(Sequential, dtype=self.dtype)
        parts = [
            BasicConv2d(self.branch0, 1, 1, 0, self.dtype, name="branch0")(x),
            seq(self.branch1, name="branch1")(x),
        ]
        if self.branch2 is not None:
            parts.append(seq(self.branch2, name="branch2")(x))
        up = layers.Conv(x.shape[-1], 1, 1, 0, dtype=self.dtype, platform=self.platform, name="conv2d")
        out = up(jnp.concatenate(parts, axis=-1)) * self.scale + x
        return jax.nn.relu(out) if self.relu else out


# timm's Block35, Block17 and Block8 (their residual scales are set where they are stacked).
BLOCK35 = dict(
    branch0=32, branch1=((32, 1, 1, 0), (32, 3, 1, 1)), branch2=((32, 1, 1, 0), (48, 3, 1, 1), (64, 3, 1, 1))
)
BLOCK17 = dict(branch0=192, branch1=((128, 1, 1, 0), (160, *ROW7), (192, *COL7)), branch2=None)
BLOCK8 = dict(branch0=192, branch1=((192, 1, 1, 0), (224, *ROW3), (256, *COL3)), branch2=None)


class Mixed6a(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b0 = BasicConv2d(384, 3, 2, 0, self.dtype, name="branch0")(x)
        b1 = Sequential([(256, 1, 1, 0), (256, 3, 1, 1), (384, 3, 2, 0)], self.dtype, name="branch1")(x)
        return jnp.concatenate([b0, b1, max_pool(x, 2)], axis=-1)


class Mixed7a(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        seq = partial(Sequential, dtype=self.dtype)
        b0 = seq([(256, 1, 1, 0), (384, 3, 2, 0)], name="branch0")(x)
        b1 = seq([(256, 1, 1, 0), (288, 3, 2, 0)], name="branch1")(x)
        b2 = seq([(256, 1, 1, 0), (288, 3, 1, 1), (320, 3, 2, 0)], name="branch2")(x)
        return jnp.concatenate([b0, b1, b2, max_pool(x, 2)], axis=-1)


class Repeat(nn.Module):
    """timm's `repeat`, `repeat_1`, `repeat_2`: a torch Sequential of `count` identical blocks named "0", "1", ..."""

    block: Callable[..., nn.Module]
    count: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.count):
            x = self.block(name=str(i))(x)
        return x


class InceptionResnetV2(nn.Module):
    """timm's `inception_resnet_v2` on NHWC images [B, H, W, 3] (timm: 299x299 in [-1, 1]).

    Returns {"features": [B, 1536] (global average pool after `conv2d_7b`), "logits": [B, num_classes] (`classif`;
    absent when num_classes is 0)}. `platform` picks the convolution formulation of the residual 1x1 convs.
    """

    num_classes: int = NUM_CLASSES
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        block = partial(Residual, dtype=d, platform=self.platform)
        x = BasicConv2d(32, 3, 2, 0, d, name="conv2d_1a")(x)
        x = BasicConv2d(32, 3, 1, 0, d, name="conv2d_2a")(x)
        x = BasicConv2d(64, 3, 1, 1, d, name="conv2d_2b")(x)
        x = BasicConv2d(80, 1, 1, 0, d, name="conv2d_3b")(max_pool(x, 2))
        x = BasicConv2d(192, 3, 1, 0, d, name="conv2d_4a")(x)
        x = Mixed5b(d, name="mixed_5b")(max_pool(x, 2))
        x = Repeat(partial(block, **BLOCK35, scale=0.17), 10, name="repeat")(x)
        x = Repeat(partial(block, **BLOCK17, scale=0.10), 20, name="repeat_1")(Mixed6a(d, name="mixed_6a")(x))
        x = Repeat(partial(block, **BLOCK8, scale=0.20), 9, name="repeat_2")(Mixed7a(d, name="mixed_7a")(x))
        x = block(**BLOCK8, scale=1.0, relu=False, name="block8")(x)
        x = BasicConv2d(NUM_FEATURES, 1, 1, 0, d, name="conv2d_7b")(x)
        return classify(x, self.num_classes, "classif")


def build(config: dict, dtype=jnp.float32, attention: str = "auto", platform: str | None = None) -> InceptionResnetV2:
    del attention  # no attention in Inception
    return InceptionResnetV2(num_classes=config.get("num_classes", NUM_CLASSES), dtype=dtype, platform=platform)


def example_inputs(config: dict) -> tuple:
    """The smallest input the network accepts (params do not depend on the image size)."""
    return (jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32),)


ARCHITECTURES = {
    "InceptionResnetV2": Architecture(
        name="InceptionResnetV2", kind="inception", build=build, example_inputs=example_inputs
    )
}
