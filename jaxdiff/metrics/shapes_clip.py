"""The shapes world's CLIP-style pair: the pipeline's text encoder (a transformers `CLIPTextModel`) and a small
image CNN, trained contrastively together by tools/train_shapes.py; here kept as a CLIP-score-style metric.

The image encoder, the text projection (pooled text state -> joint space) and the logit scale live in one
folder (config.json + params.safetensors); the text encoder and tokenizer are those of the `shapes` pipeline.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.convert.safetensors_io import load_safetensors, write_safetensors
from jaxdiff.metrics.probe import conv_tower

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "shapes_clip"
CONFIG = "config.json"
PARAMS = "params.safetensors"
DEFAULT_CONFIG = {
    "channels": [32, 64, 128],
    "groups": 8,
    "projection_dim": 128,
    "text_hidden_size": 128,
    "image_size": 32,
}


class ImageEncoder(nn.Module):
    """images [B, H, W, 3] in [0, 1] -> embeddings [B, projection_dim] (not normalised)."""

    channels: tuple[int, ...] = (32, 64, 128)
    projection_dim: int = 128
    groups: int = 8

    @nn.compact
    def __call__(self, images):
        x = conv_tower(images, self.channels, self.groups)
        x = nn.silu(nn.Dense(2 * self.projection_dim, name="fc")(x))
        return nn.Dense(self.projection_dim, name="proj")(x)


class ShapesCLIPHead(nn.Module):
    """The trainable non-text parts: image encoder, text projection (no bias, as CLIP) and logit scale."""

    channels: tuple[int, ...] = (32, 64, 128)
    projection_dim: int = 128
    groups: int = 8

    def setup(self):
        self.image_encoder = ImageEncoder(self.channels, self.projection_dim, self.groups)
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False)
        self.logit_scale = self.param("logit_scale", lambda _: jnp.asarray(np.log(1 / 0.07), jnp.float32))

    def image_embeds(self, images):
        return _normalise(self.image_encoder(images))

    def text_embeds(self, pooled):
        return _normalise(self.text_projection(pooled))

    def __call__(self, images, pooled):
        """Similarity logits [B_images, B_texts] (scaled)."""
        scale = jnp.exp(jnp.clip(self.logit_scale, 0.0, np.log(100.0)))
        return scale * self.image_embeds(images) @ self.text_embeds(pooled).T


def _normalise(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


def build_head(config: dict) -> ShapesCLIPHead:
    return ShapesCLIPHead(tuple(config["channels"]), config["projection_dim"], config["groups"])


def init_head(config: dict | None = None, seed: int = 0) -> tuple[dict, dict]:
    config = {**DEFAULT_CONFIG, **(config or {})}
    s = config["image_size"]
    params = build_head(config).init(
        jax.random.PRNGKey(seed), jnp.zeros((1, s, s, 3)), jnp.zeros((1, config["text_hidden_size"]))
    )["params"]
    return config, params


def save_head(folder: str | Path, config: dict, params) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    write_safetensors(folder / PARAMS, flat, metadata={"format": "jaxdiff-shapes-clip"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


@dataclasses.dataclass
class ShapesCLIP:
    """CLIP-style score: `score(images, prompts)` = cosine similarity of image and prompt embeddings, [N]."""

    config: dict
    params: dict
    text_encoder: object  # jaxdiff Model (CLIPTextModel)
    tokenizer: object

    def __post_init__(self):
        head = build_head(self.config)
        self._image = jax.jit(lambda p, x: head.apply({"params": p}, x, method="image_embeds"))
        self._text = jax.jit(
            lambda p, tp, ids: head.apply(
                {"params": p}, self.text_encoder.apply(tp, ids)["pooler_output"], method="text_embeds"
            )
        )

    def image_embeds(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        return np.asarray(self._image(self.params, jnp.asarray(images, jnp.float32)))

    def text_embeds(self, prompts: list[str]) -> np.ndarray:
        from jaxdiff.sampling import text

        ids = text.tokenize(self.tokenizer, list(prompts))
        return np.asarray(self._text(self.params, self.text_encoder.params, jnp.asarray(ids)))

    def score(self, images, prompts: list[str]) -> np.ndarray:
        return np.sum(self.image_embeds(images) * self.text_embeds(prompts), axis=-1)


def load_shapes_clip(folder: str | Path | None = None, pipeline: str | Path = "shapes") -> ShapesCLIP:
    """The image/text pair: head from `folder` (default: jaxdiff/assets/shapes_clip), text encoder and tokenizer
    from the pipeline folder (default: the built-in `shapes` model)."""
    from jaxdiff.convert import checkpoint
    from jaxdiff.sampling import pipeline as pipeline_lib
    from jaxdiff.sampling import text

    folder = Path(folder) if folder is not None else DEFAULT_PATH
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"no shapes CLIP head at {folder} (train it with tools/train_shapes.py --stage clip)")
    config = {**DEFAULT_CONFIG, **json.loads((folder / CONFIG).read_text())}
    flat = load_safetensors(folder / PARAMS)
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    root = pipeline_lib.resolve(pipeline)
    encoder = checkpoint.load_component(root / "text_encoder")
    return ShapesCLIP(config, params, encoder, text.load_tokenizer(root / "tokenizer"))
