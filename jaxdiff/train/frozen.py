"""The frozen VAE and CLIP text encoder of image + caption training: found, sharded, loaded, and run inside the step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.sharding import Mesh

from jaxdiff import sharding
from jaxdiff.models.model import Model
from jaxdiff.sampling import text
from jaxdiff.train.config import ConfigError

KINDS = {"vae": "vae", "text_encoder": "clip_text"}  # component -> the Model.kind it must be


@dataclasses.dataclass
class FrozenModels:
    """Abstract models (ShapeDtypeStruct params: nothing is read until `load_params`) and where they come from.

    paths: {"vae", "text_encoder"} -> component folder, "tokenizer" -> tokenizer folder or None;
    empty_ids: the empty prompt's token ids [L] int32 (what caption dropout substitutes), None without a tokenizer.
    """

    vae: Model
    text_encoder: Model
    paths: dict[str, Path | None]
    empty_ids: np.ndarray | None

    def shardings(self, mesh: Mesh, rules) -> dict[str, Any]:
        """NamedShardings of {"vae", "text_encoder"} params from their logical axes, as the trained params get."""
        return {
            name: sharding.param_shardings(model.params, model.logical_axes, mesh, rules)
            for name, model in (("vae", self.vae), ("text_encoder", self.text_encoder))
        }

    def load_params(self) -> dict[str, Any]:
        """{"vae", "text_encoder"} -> float32 params read from the component folders (host arrays)."""
        from jaxdiff.convert import checkpoint

        return {name: checkpoint.load_component(self.paths[name]).params for name in ("vae", "text_encoder")}


def tokenizer_folder(spec: str) -> Path:
    """A CLIP tokenizer folder from itself, from a pipeline folder holding `tokenizer/`, or from a built-in name."""
    from jaxdiff.sampling.pipeline import BUILTIN

    path = BUILTIN[spec] if spec in BUILTIN else Path(spec).expanduser()
    if (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if not path.is_dir():
        raise ConfigError(f"tokenizer folder not found: {spec}")
    return path.resolve()


def _pipeline_folder(spec: str) -> Path:
    from jaxdiff.sampling.pipeline import resolve

    try:
        return resolve(spec).resolve()
    except FileNotFoundError as e:
        raise ConfigError(f"config.model.pipeline: {e}") from None


def _abstract(name: str, path: Path, key: str, dtype, attention: str, platform: str | None) -> Model:
    from jaxdiff.api import init_model

    if not (path / "config.json").is_file():
        hint = f" (a pipeline folder? give its {name}/ folder)" if (path / name).is_dir() else ""
        raise ConfigError(f"{key}={str(path)!r}: no {name} there, {path / 'config.json'} is missing{hint}")
    try:
        model = init_model(path, abstract=True, dtype=dtype, attention=attention, platform=platform)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if model.kind != KINDS[name]:
        raise ConfigError(f"{key}={str(path)!r} is a {model.architecture.name}, not a {name}")
    return model


def from_config(config: mlc.ConfigDict, dtype=jnp.float32, platform: str | None = None) -> FrozenModels:
    """The frozen encoders of a validated config with `objective.image_key` set; ConfigError when missing.

    `platform`: the platform of the mesh the step is compiled for (None: the host's default backend)."""
    m = config.model
    pipeline = _pipeline_folder(m.pipeline) if m.pipeline else None
    paths: dict[str, Path | None] = {}
    models = {}
    for name in ("vae", "text_encoder"):
        key = f"config.model.pretrained_{name}"
        if m[f"pretrained_{name}"]:
            path = Path(m[f"pretrained_{name}"]).expanduser().resolve()
            if not path.exists():
                raise ConfigError(f"{key}: no such folder: {path}")
        else:
            path, key = pipeline / name, f"config.model.pipeline ({pipeline})"
        # float16 VAEs overflow (diffusers' force_upcast); the text encoder runs in the compute dtype.
        model_dtype = jnp.float32 if name == "vae" and dtype == jnp.float16 else dtype
        models[name] = _abstract(name, path, key, model_dtype, m.attention, platform)
        paths[name] = path
    tokenizer = None
    if m.tokenizer:
        tokenizer = tokenizer_folder(m.tokenizer)
    elif pipeline is not None and (pipeline / "tokenizer").is_dir():
        tokenizer = pipeline / "tokenizer"
    paths["tokenizer"] = tokenizer
    if tokenizer is None and config.objective.caption_dropout > 0:
        raise ConfigError(f"config.objective.caption_dropout: {pipeline} has no tokenizer/; set config.model.tokenizer")
    empty_ids = None
    if tokenizer is not None:
        try:
            empty_ids = text.tokenize(text.load_tokenizer(tokenizer), [""])[0]
        except (ValueError, OSError) as e:
            raise ConfigError(f"tokenizer {tokenizer}: {e}") from None
    return FrozenModels(models["vae"], models["text_encoder"], paths, empty_ids)


def check_unet(frozen: FrozenModels, unet_config: dict) -> None:
    """ConfigError unless the UNet takes the VAE's latent channels and the text encoder's hidden size."""
    latent, width = frozen.vae.config.get("latent_channels", 4), frozen.text_encoder.config.get("hidden_size")
    problems = []
    if unet_config.get("in_channels", 4) != latent:
        problems.append(f"in_channels={unet_config.get('in_channels', 4)} but the VAE has latent_channels={latent}")
    cross = unet_config.get("cross_attention_dim")
    if isinstance(cross, int) and width is not None and cross != width:
        problems.append(f"cross_attention_dim={cross} but the text encoder has hidden_size={width}")
    if problems:
        raise ConfigError(f"the UNet does not fit the frozen encoders: {'; '.join(problems)}")


def encoder(frozen: FrozenModels, objective: mlc.ConfigDict) -> Callable:
    """encode(frozen_params, batch, rng) -> (latents [B, h, w, C], context [B, L, D]), float32, no gradient.

    images = batch[image_key] uint8 [B, H, W, 3] -> x = images / 127.5 - 1; (vae_rng, drop_rng) = split(rng);
    latents = (mean + exp(logvar / 2) * N(0, I) - shift_factor) * scaling_factor (a posterior sample, as
    diffusers' train_text_to_image); ids = batch[caption_key] [B, L], each row replaced by the empty prompt's
    with probability caption_dropout (drawn from drop_rng); context = the text encoder's last hidden state.
    """
    vae, text_encoder = frozen.vae, frozen.text_encoder
    scale = float(vae.config.get("scaling_factor") or 0.18215)
    shift = float(vae.config.get("shift_factor") or 0.0)
    image_key, caption_key, p = objective.image_key, objective.caption_key, float(objective.caption_dropout)
    empty = frozen.empty_ids

    def encode(params, batch, rng):
        images, ids = batch[image_key], batch[caption_key]
        if images.dtype != jnp.uint8 or images.ndim != 4:
            raise TypeError(f"batch[{image_key!r}] must be uint8 images [B, H, W, 3], got {images.dtype}{images.shape}")
        vae_rng, drop_rng = jax.random.split(rng)
        mean, logvar = vae.encode(params["vae"], images.astype(jnp.float32) / 127.5 - 1.0)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(vae_rng, mean.shape, jnp.float32)
        latents = (z - shift) * scale
        ids = ids.astype(jnp.int32)
        if p > 0:
            if ids.shape[-1] != empty.shape[0]:
                raise ValueError(
                    f"batch[{caption_key!r}] has {ids.shape[-1]} tokens but the model's tokenizer pads to "
                    f"{empty.shape[0]}: tokenize the captions with the same tokenizer (data.tokenizer)"
                )
            drop = jax.random.uniform(drop_rng, (ids.shape[0],)) < p
            ids = jnp.where(drop[:, None], jnp.asarray(empty)[None, :], ids)
        context = text.sd_conditioning(text_encoder, params["text_encoder"], ids).astype(jnp.float32)
        return jax.lax.stop_gradient(latents), jax.lax.stop_gradient(context)

    return encode
