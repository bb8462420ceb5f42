"""The public entry points: `load_model`, `init_model`, `load_components` (see DESIGN.md §2)."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from jaxdiff.convert import checkpoint
from jaxdiff.models.model import Model, create


def load_model(
    path: str | os.PathLike, dtype=jnp.float32, attention: str = "auto", platform: str | None = None
) -> Model:
    """A model from a diffusers/transformers component folder (config.json + weights) or a jaxdiff checkpoint.

    Params are float32 jax arrays; `dtype` is the compute dtype (e.g. jnp.bfloat16). `platform` is the platform its
    programs are compiled for ("cpu", "gpu", "tpu"; None: the host's default backend): it picks attention and
    convolution kernels.
    """
    return checkpoint.load_component(path, dtype=dtype, attention=attention, platform=platform)


def load_components(
    path: str | os.PathLike, dtype=jnp.float32, attention: str = "auto", platform: str | None = None
) -> dict[str, Model]:
    """Every model of a diffusers pipeline folder or jaxdiff checkpoint, by component name (unet, vae, ...)."""
    return checkpoint.load_components(path, dtype=dtype, attention=attention, platform=platform)


def init_model(
    config_or_path: dict | str | os.PathLike,
    abstract: bool = True,
    dtype=jnp.float32,
    seed: int = 0,
    attention: str = "auto",
    platform: str | None = None,
) -> Model:
    """A model from a config dict, a config.json or a folder holding one.

    abstract=True: params are jax.ShapeDtypeStruct (nothing allocated); otherwise randomly initialised from `seed`.
    `platform`: the platform the model's programs are compiled for (None: the host's default backend).
    """
    if isinstance(config_or_path, dict):
        config, where = dict(config_or_path), "config"
    else:
        path = Path(config_or_path)
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        where = path / checkpoint.CONFIG if path.is_dir() else path
        config = checkpoint.read_json(where)
    architecture = checkpoint.architecture_of(config, where)
    return create(
        architecture, config, abstract=abstract, dtype=dtype, attention=attention, seed=seed, platform=platform
    )
