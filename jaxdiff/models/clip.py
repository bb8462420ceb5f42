"""CLIP text encoder (transformers `CLIPTextModel` / `CLIPTextModelWithProjection`) as a Flax module."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.layers import EMBED, HEADS, MLP, Dense, Embed, LayerNorm
from jaxdiff.models.model import Architecture

# transformers' `CLIPTextConfig` defaults, used when a config.json omits a key.
DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}

# Legacy configs (before transformers PR #24773) say eos_token_id=2 and pool at argmax(input_ids).
LEGACY_EOS_TOKEN_ID = 2


def _cfg(config, key):
    return config.get(key, DEFAULTS[key])


def activation(name: str):
    """The transformers `ACT2FN[name]` used in CLIP's MLP."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported CLIP hidden_act {name!r}: use quick_gelu, gelu, gelu_new or gelu_pytorch_tanh")


class CLIPAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections named as in PyTorch."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x, mask):
        b, length, d = x.shape
        head_dim = d // self.num_heads

        def proj(name):
            y = Dense(d, axes=(EMBED, HEADS), dtype=self.dtype, name=name)(x)
            return y.reshape(b, length, self.num_heads, head_dim)

        # dot_product_attention scales by head_dim**-0.5, as CLIPAttention does.
        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        out = dot_product_attention(q, k, v, mask=mask, implementation=self.attention, platform=self.platform)
        return Dense(d, axes=(HEADS, EMBED), dtype=self.dtype, name="out_proj")(out.reshape(b, length, d))


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Dense(self.intermediate_size, axes=(EMBED, MLP), dtype=self.dtype, name="fc1")(x)
        h = activation(self.hidden_act)(h)
        return Dense(x.shape[-1], axes=(MLP, EMBED), dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    num_heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x, mask):
        h = LayerNorm(self.eps, self.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(self.num_heads, self.dtype, self.attention, self.platform, name="self_attn")(h, mask)
        h = LayerNorm(self.eps, self.dtype, name="layer_norm2")(x)
        return x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(h)


class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    max_positions: int
    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_embeds=None):
        length = input_ids.shape[-1]
        if length > self.max_positions:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {self.max_positions}")
        lookup = Embed(self.vocab_size, self.hidden_size, self.dtype, name="token_embedding")
        if token_embeds is None:
            tokens = lookup(input_ids)
        else:
            expected = input_ids.shape + (self.hidden_size,)
            if tuple(token_embeds.shape) != expected:
                raise ValueError(
                    f"token_embeds must have shape {expected} (input_ids + hidden), got {token_embeds.shape}"
                )
            if self.is_initializing():
                lookup(input_ids)  # the table is part of the model whatever the inputs
            tokens = jnp.asarray(token_embeds).astype(self.dtype)
        positions = Embed(self.max_positions, self.hidden_size, self.dtype, name="position_embedding")(
            jnp.arange(length)
        )
        return tokens + positions[None]


class CLIPEncoder(nn.Module):
    config: dict
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        hidden_states = [x]
        for i in range(_cfg(c, "num_hidden_layers")):
            x = CLIPEncoderLayer(
                _cfg(c, "num_attention_heads"),
                _cfg(c, "intermediate_size"),
                _cfg(c, "hidden_act"),
                _cfg(c, "layer_norm_eps"),
                self.dtype,
                self.attention,
                self.platform,
                name=f"layers_{i}",
            )(x, mask)
            hidden_states.append(x)
        return tuple(hidden_states)


class CLIPTextTransformer(nn.Module):
    """transformers' `text_model`: embeddings, encoder, final_layer_norm and EOS pooling.

    `token_embeds` [B, L, D] (optional) replaces the token-embedding lookup (transformers' `inputs_embeds` of the
    token table; position embeddings are still added); `input_ids` are still needed for EOS pooling.
    """

    config: dict
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_embeds=None):
        c = self.config
        sizes = (_cfg(c, "vocab_size"), _cfg(c, "max_position_embeddings"), _cfg(c, "hidden_size"))
        x = CLIPTextEmbeddings(*sizes, self.dtype, name="embeddings")(input_ids, token_embeds)
        length = input_ids.shape[-1]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, Lq, Lk], causal always
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        hidden_states = CLIPEncoder(c, self.dtype, self.attention, self.platform, name="encoder")(x, mask)
        last = LayerNorm(_cfg(c, "layer_norm_eps"), self.dtype, name="final_layer_norm")(hidden_states[-1])
        eos = _cfg(c, "eos_token_id")
        if eos == LEGACY_EOS_TOKEN_ID:
            # Legacy rule: the EOS token has the largest id in the original vocabulary.
            index = jnp.argmax(input_ids, axis=-1)
        else:
            # First EOS (padding may reuse the EOS id); 0 when a row has none, like torch.
            index = jnp.argmax((input_ids == eos).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, index[:, None, None], axis=1)[:, 0]
        return {"last_hidden_state": last, "hidden_states": hidden_states, "pooler_output": pooled}


class CLIPTextModel(nn.Module):
    """input_ids [B, L] int32, attention_mask [B, L] (optional) -> dict of outputs.

    last_hidden_state [B, L, D] (final-layer-normed); hidden_states: embeddings then every layer's output
    (num_layers + 1 entries, not normed); pooler_output [B, D] at the EOS token; text_embeds [B, P] when
    `with_projection`. `token_embeds` [B, L, D] (optional, float) replaces the token-embedding lookup of
    `input_ids` (continuous prompts, soft-prompt attacks); the ids still choose the pooled EOS position.
    """

    config: dict
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None
    with_projection: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_embeds=None):
        out = CLIPTextTransformer(self.config, self.dtype, self.attention, self.platform, name="text_model")(
            input_ids, attention_mask, token_embeds
        )
        if self.with_projection:
            features = _cfg(self.config, "projection_dim")
            proj = Dense(features, use_bias=False, axes=(EMBED, MLP), dtype=self.dtype, name="text_projection")
            out["text_embeds"] = proj(out["pooler_output"])
        return out


def _builder(with_projection: bool):
    def build(config: dict, dtype=jnp.float32, attention: str = "auto", platform: str | None = None) -> CLIPTextModel:
        return CLIPTextModel(
            config, dtype=dtype, attention=attention, platform=platform, with_projection=with_projection
        )

    return build


def example_inputs(config: dict) -> tuple:
    return (jnp.zeros((1, _cfg(config, "max_position_embeddings")), jnp.int32),)


ARCHITECTURES = {
    "CLIPTextModel": Architecture(
        name="CLIPTextModel",
        kind="clip_text",
        build=_builder(False),
        example_inputs=example_inputs,
    ),
    "CLIPTextModelWithProjection": Architecture(
        name="CLIPTextModelWithProjection",
        kind="clip_text",
        build=_builder(True),
        example_inputs=example_inputs,
    ),
}
