"""CLIP image tower (transformers `CLIPVisionModel` / `CLIPVisionModelWithProjection`) and the two-tower `CLIPModel`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.clip import DEFAULTS as TEXT_DEFAULTS
from jaxdiff.models.clip import CLIPEncoder, CLIPTextTransformer
from jaxdiff.models.layers import CONV_IN, CONV_OUT, EMBED, MLP, Dense, Embed, LayerNorm
from jaxdiff.models.model import Architecture

# transformers' `CLIPVisionConfig` defaults (ViT-B/32), used when a config.json omits a key.
VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# transformers' `CLIPConfig` defaults for the joint model.
CLIP_DEFAULTS = {"projection_dim": 512, "logit_scale_init_value": 2.6592}


def vision_config(config: dict) -> dict:
    """A vision config with every key the tower reads (the shared CLIPEncoder would fall back to text defaults)."""
    return {**VISION_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}


def text_config(config: dict) -> dict:
    return {**TEXT_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}


class PatchEmbedding(nn.Module):
    """A stride-`patch_size` convolution without bias (PyTorch's `patch_embedding` Conv2d, kernel [p, p, C, D]),
    computed as one matmul over non-overlapping patches: the same numbers as the convolution, and it compiles in a
    fraction of the time of layers.Conv's CPU im2col, which would slice p² = 1024 windows for ViT-B/32."""

    features: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = x[:, : x.shape[1] // p * p, : x.shape[2] // p * p]  # a convolution drops the partial last patch
        b, h, w, c = x.shape
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, CONV_IN, CONV_OUT))
        kernel = self.param("kernel", init, (p, p, c, self.features), jnp.float32)
        # [B, H/p, p, W/p, p, C] -> [B, (H/p)(W/p), p·p·C]: patches row-major over the grid, as torch's flatten(2).
        patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
        k = kernel.reshape(p * p * c, self.features).astype(self.dtype)
        # Full float32 products when computing in float32, as layers.Dense (accelerators default to bf16 passes).
        precision = jax.lax.Precision.HIGHEST if jnp.dtype(self.dtype) == jnp.float32 else None
        return jnp.dot(patches.astype(self.dtype), k, precision=precision)


class CLIPVisionEmbeddings(nn.Module):
    """Patch embedding (a stride-`patch_size` convolution without bias), the [CLS] token and learned positions."""

    hidden_size: int
    patch_size: int
    image_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        b, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            # transformers refuses other sizes too unless asked to interpolate the position embeddings.
            raise ValueError(f"CLIP vision input must be {self.image_size}x{self.image_size}, got {h}x{w}")
        p, d = self.patch_size, self.hidden_size
        patches = PatchEmbedding(d, p, self.dtype, name="patch_embedding")(pixel_values)
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (EMBED,))
        cls = self.param("class_embedding", init, (d,), jnp.float32)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))
        x = jnp.concatenate([cls, patches.astype(self.dtype)], axis=1)
        positions = Embed(x.shape[1], d, self.dtype, name="position_embedding")(jnp.arange(x.shape[1]))
        return x + positions[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' `vision_model`: embeddings, `pre_layrnorm` (sic), the text tower's encoder layers without a mask,
    and `post_layernorm` on the [CLS] token (the pooled output; last_hidden_state is not normed)."""

    config: dict  # complete: vision_config(...)
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        x = CLIPVisionEmbeddings(c["hidden_size"], c["patch_size"], c["image_size"], self.dtype, name="embeddings")(
            pixel_values
        )
        x = LayerNorm(c["layer_norm_eps"], self.dtype, name="pre_layrnorm")(x)
        hidden_states = CLIPEncoder(c, self.dtype, self.attention, self.platform, name="encoder")(x, None)
        last = hidden_states[-1]
        pooled = LayerNorm(c["layer_norm_eps"], self.dtype, name="post_layernorm")(last[:, 0])
        return {"last_hidden_state": last, "hidden_states": hidden_states, "pooler_output": pooled}


class CLIPVisionModel(nn.Module):
    """pixel_values [B, S, S, 3] (NHWC, already CLIP-normalised, S = image_size) -> dict of outputs.

    last_hidden_state [B, 1 + (S/patch)², D]; hidden_states: the pre-layernormed embeddings then every layer's output;
    pooler_output [B, D] (post-layernormed [CLS]); image_embeds [B, P] when `with_projection`.
    """

    config: dict
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None
    with_projection: bool = False

    @nn.compact
    def __call__(self, pixel_values):
        c = vision_config(self.config)
        out = CLIPVisionTransformer(c, self.dtype, self.attention, self.platform, name="vision_model")(pixel_values)
        if self.with_projection:
            proj = Dense(c["projection_dim"], False, (EMBED, MLP), self.dtype, name="visual_projection")
            out["image_embeds"] = proj(out["pooler_output"])
        return out


class CLIPModel(nn.Module):
    """transformers' `CLIPModel`: both towers, their projections into the joint space and `logit_scale`.

    `__call__(input_ids, pixel_values, attention_mask=None)` -> L2-normalised text_embeds / image_embeds and
    logits_per_image / logits_per_text, as `CLIPModel.forward`; `image_features` / `text_features` are the
    unnormalised projections (`get_image_features` / `get_text_features`).
    """

    config: dict
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    def setup(self):
        c = {**CLIP_DEFAULTS, **self.config}
        proj = dict(use_bias=False, axes=(EMBED, MLP), dtype=self.dtype)
        self.text_model = CLIPTextTransformer(
            text_config(c.get("text_config") or {}), self.dtype, self.attention, self.platform
        )
        self.vision_model = CLIPVisionTransformer(
            vision_config(c.get("vision_config") or {}), self.dtype, self.attention, self.platform
        )
        self.text_projection = Dense(c["projection_dim"], **proj)
        self.visual_projection = Dense(c["projection_dim"], **proj)
        init = nn.with_logical_partitioning(nn.initializers.constant(c["logit_scale_init_value"]), ())
        self.logit_scale = self.param("logit_scale", init, (), jnp.float32)

    def image_features(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values)["pooler_output"])

    def text_features(self, input_ids, attention_mask=None):
        return self.text_projection(self.text_model(input_ids, attention_mask)["pooler_output"])

    def __call__(self, input_ids, pixel_values, attention_mask=None):
        image = _normalize(self.image_features(pixel_values))
        text = _normalize(self.text_features(input_ids, attention_mask))
        logits_per_text = jnp.exp(self.logit_scale) * (text @ image.T)
        return {
            "image_embeds": image,
            "text_embeds": text,
            "logits_per_text": logits_per_text,
            "logits_per_image": logits_per_text.T,
        }


def _normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _vision_builder(with_projection: bool):
    def build(config: dict, dtype=jnp.float32, attention: str = "auto", platform: str | None = None):
        return CLIPVisionModel(
            config, dtype=dtype, attention=attention, platform=platform, with_projection=with_projection
        )

    return build


def _pixels(config: dict):
    size = vision_config(config)["image_size"]
    return jnp.zeros((1, size, size, 3), jnp.float32)


def _clip_inputs(config: dict) -> tuple:
    length = text_config(config.get("text_config") or {})["max_position_embeddings"]
    return jnp.zeros((1, length), jnp.int32), _pixels(config.get("vision_config") or {})


def _build_clip(config: dict, dtype=jnp.float32, attention: str = "auto", platform: str | None = None) -> CLIPModel:
    return CLIPModel(config, dtype=dtype, attention=attention, platform=platform)


ARCHITECTURES = {
    "CLIPVisionModel": Architecture(
        name="CLIPVisionModel",
        kind="clip_vision",
        build=_vision_builder(False),
        example_inputs=lambda config: (_pixels(config),),
    ),
    "CLIPVisionModelWithProjection": Architecture(
        name="CLIPVisionModelWithProjection",
        kind="clip_vision",
        build=_vision_builder(True),
        example_inputs=lambda config: (_pixels(config),),
    ),
    "CLIPModel": Architecture(name="CLIPModel", kind="clip", build=_build_clip, example_inputs=_clip_inputs),
}


def image_embeds(model, params, pixel_values):
    """Projected, unnormalised image embeddings [B, P] of a CLIPModel or CLIPVisionModelWithProjection `Model`."""
    if model.architecture.name == "CLIPModel":
        return model.apply(params, pixel_values, method="image_features")
    if model.architecture.name == "CLIPVisionModelWithProjection":
        return model.apply(params, pixel_values)["image_embeds"]
    raise ValueError(
        f"{model.architecture.name} has no image projection: use CLIPModel or CLIPVisionModelWithProjection"
    )


def text_embeds(model, params, input_ids, attention_mask=None):
    """Projected, unnormalised text embeddings [B, P] of a CLIPModel or CLIPTextModelWithProjection `Model`."""
    if model.architecture.name == "CLIPModel":
        return model.apply(params, input_ids, attention_mask, method="text_features")
    if model.architecture.name == "CLIPTextModelWithProjection":
        return model.apply(params, input_ids, attention_mask)["text_embeds"]
    raise ValueError(f"{model.architecture.name} has no text projection: use CLIPModel or CLIPTextModelWithProjection")


def image_size(model) -> int:
    """The square input size of a CLIPModel's or CLIP vision model's image tower."""
    config = (model.config.get("vision_config") or {}) if model.architecture.name == "CLIPModel" else model.config
    return vision_config(config)["image_size"]
