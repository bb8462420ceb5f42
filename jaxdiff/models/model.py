"""`Model`: a Flax module, its diffusers/transformers config, params and logical axes, used as pure functions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import platforms
from jaxdiff.models.attention import forward_mode_safe


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How to build and initialise one model class (e.g. "UNet2DConditionModel"); its PyTorch layout is in
    `jaxdiff.convert.layout`.

    build(config, dtype, attention, platform) -> nn.Module; example_inputs(config) -> tuple of arrays for init.
    """

    name: str
    kind: str  # "unet" | "controlnet" | "vae" | "clip_text" | "clip_vision" | "clip" | "inception"
    build: Callable[..., nn.Module]
    example_inputs: Callable[[dict], tuple]
    init_method: str | None = None  # module method used for init when __call__ is not enough


@dataclasses.dataclass
class Model:
    """A model as pure functions: `apply(params, ...)` is jittable; images/latents are NHWC.

    The module is built for one platform (`platform`: "cpu", "gpu", "tpu"), the platform its programs are compiled
    for, which picks its attention and convolution formulations; `for_platform` rebuilds it for another.
    """

    architecture: Architecture
    config: dict
    module: nn.Module
    params: Any
    logical_axes: Any  # same tree as params, each leaf a PartitionSpec of logical axis names

    @property
    def kind(self) -> str:
        return self.architecture.kind

    @property
    def platform(self) -> str:
        return platforms.resolve(self.module.platform)

    def for_platform(self, platform: str | None) -> Model:
        """The same model (same params) with its module built for `platform` (None: the host's default backend)."""
        return dataclasses.replace(self, module=self.module.clone(platform=platforms.resolve(platform)))

    def with_module(self, **fields) -> Model:
        """The same model (same params) with module fields replaced, e.g. `scan_layers=True` on a UNet."""
        return dataclasses.replace(self, module=self.module.clone(**fields))

    def with_params_dtype(self, dtype) -> Model:
        """The same model with its floating-point params stored in `dtype` (inference: bf16 halves the weights'
        memory; the module's compute dtype is unchanged). Training keeps float32 params."""
        dtype = jnp.dtype(dtype)

        def cast(p):
            return p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p

        return dataclasses.replace(self, params=jax.tree_util.tree_map(cast, self.params))

    def for_forward_mode(self) -> Model:
        """The same model with an attention `jax.jvp` can go through (`attention.forward_mode_safe`: XLA's in place
        of the splash / cuDNN kernels, whose custom VJPs allow reverse mode only)."""
        if not hasattr(self.module, "attention"):
            return self
        return self.with_module(attention=forward_mode_safe(self.module.attention, self.platform))

    def apply(self, params, *args, **kwargs):
        return self.module.apply({"params": params}, *args, **kwargs)

    def encode(self, params, x):
        """VAE only: x [B, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, h, w, latent_channels]."""
        return self.module.apply({"params": params}, x, method="encode")

    def decode(self, params, z):
        """VAE only: unscaled latents z [B, h, w, latent_channels] -> x [B, H, W, 3] in [-1, 1]."""
        return self.module.apply({"params": params}, z, method="decode")

    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(self.params)))


def create(
    architecture: Architecture,
    config: dict,
    *,
    abstract: bool,
    dtype=jnp.float32,
    attention="auto",
    seed=0,
    platform: str | None = None,
):
    """Build the module and initialise params (shape-only when `abstract`).

    `platform`: the platform the model's programs will be compiled for (the platform of the mesh or devices they
    run on, `jaxdiff.platforms.of(mesh)`); None means the host's default backend.
    """
    module = architecture.build(config, dtype=dtype, attention=attention, platform=platforms.resolve(platform))
    inputs = architecture.example_inputs(config)
    kwargs = {"method": architecture.init_method} if architecture.init_method else {}

    def init():
        return module.init(jax.random.PRNGKey(seed), *inputs, **kwargs)["params"]

    boxed = jax.eval_shape(init)
    logical_axes = nn.get_partition_spec(boxed)
    if abstract:
        params = nn.unbox(boxed)
    else:
        params = jax.jit(lambda: nn.unbox(init()))()
    return Model(architecture, dict(config), module, params, logical_axes)
