"""Scaled dot-product attention, implementation chosen per target platform (splash on TPU, cuDNN flash on GPU,
chunked on CPU)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxdiff import platforms
from jaxdiff.models import splash

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "einsum", "chunked")

# Query-chunk length for the chunked CPU path: keeps the [chunk, L] logits block in cache.
CPU_QUERY_CHUNK = 128
# Sequences up to this length run unchunked.
CPU_CHUNK_ABOVE = 256


def dot_product_attention(
    q, k, v, *, mask=None, upcast: bool = False, implementation: str = "auto", platform: str | None = None
):
    """Attention over q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    `mask` is an optional boolean [B or 1, 1 or H, Lq, Lk] (True = attend). `upcast` computes the logits
    and the softmax in float32 (diffusers' `upcast_attention`/`upcast_softmax`); the float32 path always
    does so. `implementation` is one of IMPLEMENTATIONS; "auto" picks for `platform`, the platform the program is
    compiled for (None: the host's default backend). "splash" (the TPU Pallas kernel, `splash.py`; Pallas' interpret
    mode off TPU) runs where its shapes allow and XLA attention elsewhere (queries not a multiple of 128, a mask).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = auto_implementation(q, mask, platform)
    if implementation == "splash":
        if splash.supported(q, k, mask):
            return splash.attention(q, k, v, interpret=platforms.resolve(platform) != "tpu").astype(q.dtype)
        implementation = "xla"
    scale = 1.0 / math.sqrt(q.shape[-1])
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    if implementation == "xla":
        if upcast:
            out = jax.nn.dot_product_attention(
                q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask=mask, scale=scale
            )
            return out.astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    if implementation == "chunked" and q.shape[1] > CPU_CHUNK_ABOVE:
        return _chunked_attention(q, k, v, mask, scale, upcast, CPU_QUERY_CHUNK)
    return _einsum_attention(q, k, v, mask, scale, upcast)


def forward_mode_safe(implementation: str, platform: str | None = None) -> str:
    """An implementation `jax.jvp` can differentiate, for `implementation` on `platform`: the splash (Pallas) and
    cuDNN kernels have custom VJPs, so reverse mode only; they, and an "auto" that may pick them (TPU, GPU), become
    "xla". CPU's "auto" (chunked / einsum) is plain JAX and stays."""
    if implementation in ("splash", "cudnn"):
        return "xla"
    if implementation == "auto" and platforms.resolve(platform) in ("tpu", "gpu"):
        return "xla"
    return implementation


def auto_implementation(q, mask=None, platform: str | None = None) -> str:
    """What "auto" runs for queries `q` [B, L, H, D] on `platform` (None: the host's default backend)."""
    platform = platforms.resolve(platform)
    if platform == "gpu":
        # cuDNN flash attention needs half precision and head_dim a multiple of 8 (<= 128).
        d = q.shape[-1]
        if q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128 and mask is None:
            return "cudnn"
        return "xla"
    if platform == "cpu":
        return "chunked"
    # The unrolled query chunks only pay off in a CPU's caches; on TPU they multiply the program's size. Splash
    # attention keeps the [Lq, Lk] probabilities out of HBM where its blocks fit the queries.
    if platform == "tpu" and splash.supported(q, None, mask):
        return "splash"
    return "xla"


def _einsum_attention(q, k, v, mask, scale, upcast):
    # Heads-first batched matmuls ([B, H, L, D]) are ~1.5x faster than [B, L, H, D] einsums on XLA:CPU.
    compute = jnp.float32 if (upcast or q.dtype == jnp.float32) else q.dtype
    q = (q * scale).astype(compute).transpose(0, 2, 1, 3)
    k = k.astype(compute).transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=_precision(compute))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v, precision=_precision(v.dtype)).transpose(0, 2, 1, 3)


def _chunked_attention(q, k, v, mask, scale, upcast, chunk):
    # Unrolled query chunks keep each [chunk, Lk] logits block in cache; unrolled (not lax.map) because
    # XLA:CPU's backward of a scan over chunks is ~2x slower than that of the unrolled program.
    outs = []
    for start in range(0, q.shape[1], chunk):
        m = (
            None
            if mask is None
            else jnp.broadcast_to(mask, (*mask.shape[:2], q.shape[1], k.shape[1]))[:, :, start : start + chunk]
        )
        outs.append(_einsum_attention(q[:, start : start + chunk], k, v, m, scale, upcast))
    return jnp.concatenate(outs, axis=1)


@functools.cache
def _precision_for(dtype_name):
    return jax.lax.Precision.HIGHEST if dtype_name == "float32" else None


def _precision(dtype):
    return _precision_for(jnp.dtype(dtype).name)
