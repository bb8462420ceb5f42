"""Spatial transformer of the SD UNet: Attention, GEGLU feed-forward, BasicTransformerBlock, Transformer2DModel."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import attention_control
from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.layers import EMBED, HEADS, MLP, Conv, Dense, GroupNorm, LayerNorm

# T-GATE's per-attention cache (collection "attn_cache", one entry per attn1/attn2 output before the residual add):
# "compute" (no cache), "store" (compute, keep it), "store_mean" (compute, keep the mean of the two CFG halves),
# "reuse" (return the kept output without computing).
ATTN_CACHE_MODES = ("compute", "store", "store_mean", "reuse")
ATTN_CACHE = "attn_cache"


class Attention(nn.Module):
    """Multi-head (cross-)attention with diffusers' param names to_q/to_k/to_v (no bias) and to_out_0."""

    heads: int
    head_dim: int
    upcast: bool = False
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.head_dim

        def project(name, source):
            y = Dense(inner, use_bias=False, axes=(EMBED, HEADS), dtype=self.dtype, name=name)(source)
            return y.reshape(*y.shape[:2], self.heads, self.head_dim)

        cross = context is not x
        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        controlled = attention_control.active(self, cross, q.shape[1])
        if controlled is not None:  # explicit probabilities to edit, capture or differentiate
            out = attention_control.controlled_attention(self, *controlled, q, k, v)
        else:
            out = dot_product_attention(
                q, k, v, upcast=self.upcast, implementation=self.attention, platform=self.platform
            )
        out = out.reshape(*out.shape[:2], inner)
        return Dense(x.shape[-1], axes=(HEADS, EMBED), dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """Linear to 2*inner, then value * GELU(gate) with the exact (erf) GELU as in PyTorch."""

    inner: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Dense(2 * self.inner, axes=(EMBED, MLP), dtype=self.dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """`net_0` GEGLU (dim -> 4*dim) then `net_2` Linear back to dim (net_1 is dropout in PyTorch)."""

    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return Dense(dim, axes=(MLP, EMBED), dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

    heads: int
    head_dim: int
    upcast: bool = False
    only_cross_attention: bool = False
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None
    attn_cache_mode: tuple | None = None  # (attn1 mode, attn2 mode) from ATTN_CACHE_MODES; None: compute both

    @nn.compact
    def __call__(self, x, context):
        def attn(name):
            return Attention(
                self.heads, self.head_dim, self.upcast, self.attention, self.dtype, self.platform, name=name
            )

        def norm(name):
            return LayerNorm(1e-5, self.dtype, name=name)

        modes = self.attn_cache_mode or ("compute", "compute")
        self_context = context if self.only_cross_attention else None
        x = x + self._cached("attn1", modes[0], lambda: attn("attn1")(norm("norm1")(x), self_context))
        x = x + self._cached("attn2", modes[1], lambda: attn("attn2")(norm("norm2")(x), context))
        return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))

    def _cached(self, name: str, mode: str, compute):
        """An attention output through T-GATE's cache (the official tgate_processor's cache/reuse/keep_shape)."""
        if mode == "compute":
            return compute()
        if mode == "reuse":
            if not self.has_variable(ATTN_CACHE, name):
                raise ValueError(f"T-GATE: no cached {name} output to reuse (store it at an earlier step)")
            return self.get_variable(ATTN_CACHE, name)
        if mode not in ("store", "store_mean"):
            raise ValueError(f"unknown attention cache mode {mode!r}; choose from {ATTN_CACHE_MODES}")
        out = compute()
        if mode == "store_mean":  # the gate step: the mean of the two CFG halves, as keep_shape=False
            first, second = jnp.split(out, 2)
            kept = (first + second) / 2
        else:
            kept = out
        self.put_variable(ATTN_CACHE, name, kept)
        return out


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6), proj_in, `layers` transformer blocks over H*W tokens, proj_out, residual.

    `linear_projection` selects Dense proj_in/proj_out (SD 2.x, SDXL) over 1x1 convs (SD 1.x).
    """

    heads: int
    head_dim: int
    layers: int = 1
    groups: int = 32
    linear_projection: bool = False
    upcast: bool = False
    only_cross_attention: bool = False
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None
    attn_cache_mode: tuple | None = None
    # `layers` > 1 blocks as one lax.scan over their stacked params (one copy of the block in the compiled program).
    # The params keep their names (transformer_blocks_<i>); initialisation, T-GATE's cache and attention control
    # (per-layer state) take the unrolled path.
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        residual = x
        x = GroupNorm(self.groups, 1e-6, self.dtype, name="norm")(x)

        def proj(name, features, axes):
            if self.linear_projection:
                return Dense(features, axes=axes, dtype=self.dtype, name=name)
            return Conv(features, 1, padding=0, dtype=self.dtype, platform=self.platform, name=name)

        x = proj("proj_in", inner, (EMBED, MLP))(x).reshape(b, h * w, inner)
        context = context.astype(self.dtype)

        options = (
            self.heads,
            self.head_dim,
            self.upcast,
            self.only_cross_attention,
            self.attention,
            self.dtype,
            self.platform,
            self.attn_cache_mode,
        )
        if self._scannable():
            x = self._scanned_blocks(BasicTransformerBlock(*options, parent=None), x, context)
        else:
            for i in range(self.layers):
                x = BasicTransformerBlock(*options, name=f"transformer_blocks_{i}")(x, context)
        x = proj("proj_out", c, (MLP, EMBED))(x.reshape(b, h, w, inner))
        return x + residual.astype(self.dtype)

    def _scannable(self) -> bool:
        return (
            self.scan_layers
            and self.layers > 1
            and not self.is_initializing()
            and self.attn_cache_mode is None
            and not attention_control.controlling()
        )

    def _scanned_blocks(self, block: BasicTransformerBlock, x, context):
        """The blocks as one lax.scan of `block` (unbound) over their params stacked on a leading axis. The matmul
        weights are cast to the compute dtype before stacking (the Dense layers cast them anyway), the LayerNorms'
        stay float32 as they compute: the results are those of the unrolled loop."""
        params = self.variables["params"]
        layers = [params[f"transformer_blocks_{i}"] for i in range(self.layers)]

        def stack(path, *leaves):
            in_norm = any(str(getattr(k, "key", "")).startswith("norm") for k in path)
            return jnp.stack([leaf if in_norm else leaf.astype(self.dtype) for leaf in leaves])

        stacked = jax.tree_util.tree_map_with_path(stack, *layers)

        def body(hidden, layer_params):
            return block.apply({"params": layer_params}, hidden, context), None

        return jax.lax.scan(body, x, stacked)[0]
