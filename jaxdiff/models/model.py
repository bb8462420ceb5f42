"""`Model`: a Flax module, its diffusers/transformers config, params and logical axes, used as pure functions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import table as table_lib


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How to build, initialise and convert one model class (e.g. "UNet2DConditionModel").

    build(config, dtype, attention) -> nn.Module; example_inputs(config) -> tuple of arrays for init;
    list_names: Flax module names spelled `name_<i>` that PyTorch spells `name.<i>`;
    aliases(torch_key) -> alternative spellings accepted on import; ignore: key suffixes skipped on import.
    """

    name: str
    kind: str  # "unet" | "vae" | "clip_text"
    build: Callable[..., nn.Module]
    example_inputs: Callable[[dict], tuple]
    list_names: tuple[str, ...]
    weights_name: str  # file name used on export (diffusers or transformers convention)
    aliases: Callable[[str], tuple[str, ...]] = lambda key: ()
    ignore: tuple[str, ...] = ()
    init_method: str | None = None  # module method used for init when __call__ is not enough


@dataclasses.dataclass
class Model:
    """A model as pure functions: `apply(params, ...)` is jittable; images/latents are NHWC."""

    architecture: Architecture
    config: dict
    module: nn.Module
    params: Any
    logical_axes: Any  # same tree as params, each leaf a PartitionSpec of logical axis names

    @property
    def kind(self) -> str:
        return self.architecture.kind

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

    def conversion_table(self) -> list[table_lib.Entry]:
        return table_lib.build_table(self.params, self.architecture.list_names)

    def to_state_dict(self, params=None) -> dict[str, np.ndarray]:
        """PyTorch-layout float32 tensors keyed by diffusers/transformers names."""
        return table_lib.state_dict_from_params(self.conversion_table(), self.params if params is None else params)

    def load_state_dict(self, state, where: str = "checkpoint"):
        """Params from a PyTorch state dict (numpy arrays), strictly checked against this model."""
        arch = self.architecture
        table = self.conversion_table()
        aliases = {e.torch_key: arch.aliases(e.torch_key) for e in table}
        return table_lib.load_state_dict(table, state, self.params, aliases=aliases, ignore=arch.ignore, where=where)


def create(architecture: Architecture, config: dict, *, abstract: bool, dtype=jnp.float32, attention="auto", seed=0):
    """Build the module and initialise params (shape-only when `abstract`)."""
    module = architecture.build(config, dtype=dtype, attention=attention)
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
