"""LoRA-style low-rank adapters on the Dense/Conv kernels of a param tree, applied by merging.

An adapter on a layer with kernel K adds ΔK = (alpha / rank) · down ⊗ up:
- Dense kernel [in, out] (Flax layout, the transpose of PyTorch's W): down [in, r], up [r, out], ΔK = down @ up;
- Conv kernel [kh, kw, in, out]: down [kh, kw, in, r] (a conv with the layer's own kernel size, as SPM/LoRA's
  `lora_down`), up [r, out] (a 1x1 conv), ΔK[h, w] = down[h, w] @ up.
Both are exactly the forward of a LoRA branch `up(down(x))` added to the layer (up is linear and 1x1), so
`merge` gives the adapted model as ordinary params: no model code changes, and one merged model per adapter
set. `down` is Kaiming-uniform (a = √5, i.e. U(±1/sqrt(fan_in)), PyTorch's Linear/Conv default as in SPM) and
`up` is zero, so a fresh adapter merges to exactly the original params.

Adapters are a dict {module path "a/b/c": {"down": ..., "up": ...}}: a pytree that trains with optax.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxdiff.erase.common import run_once
from jaxdiff.selectors import flatten, path_str, selected_paths, unflatten


def init(params, selector="transformers", rank: int = 1, key=None):
    """Adapters (zero `up`) for every kernel leaf chosen by `selector` (see `jaxdiff.selectors`)."""
    key = jax.random.PRNGKey(0) if key is None else key
    flat = flatten(params)
    paths = [p for p in selected_paths(params, selector) if p[-1] == "kernel"]
    if not paths:
        raise ValueError(f"selector {selector!r} picks no Dense/Conv kernel")
    shapes = [tuple(flat[p].shape) for p in paths]

    def make(key):
        out = {}
        for p, shape, k in zip(paths, shapes, jax.random.split(key, len(paths))):
            fan_in = 1
            for s in shape[:-1]:
                fan_in *= int(s)
            bound = 1.0 / fan_in**0.5
            down = jax.random.uniform(k, shape[:-1] + (rank,), jnp.float32, -bound, bound)
            out[path_str(p[:-1])] = {"down": down, "up": jnp.zeros((rank, shape[-1]), jnp.float32)}
        return out

    return run_once(make, key)


def delta(adapter, alpha_over_rank: float = 1.0):
    """ΔK of one adapter, in the kernel's layout."""
    down, up = adapter["down"], adapter["up"]
    return alpha_over_rank * jnp.tensordot(down, up, axes=1)


def merge_many(params, adapter_sets: Sequence[tuple[dict, object]], alpha_over_rank: float = 1.0):
    """params with Σ_s scale_s · ΔK_s added to each adapted kernel; adapter_sets = [(adapters, scale), ...]
    (scales may be traced)."""
    flat = flatten(params)
    for adapters, scale in adapter_sets:
        for name, adapter in adapters.items():
            key = tuple(name.split("/")) + ("kernel",)
            if key not in flat:
                raise KeyError(f"adapter {name} has no kernel in these params")
            kernel = flat[key]
            flat[key] = (kernel + scale * delta(adapter, alpha_over_rank)).astype(kernel.dtype)
    return unflatten(flat)


def merge(params, adapters: dict, scale=1.0, alpha_over_rank: float = 1.0):
    """params with scale · ΔK of every adapter added to its kernel."""
    return merge_many(params, [(adapters, scale)], alpha_over_rank)


def num_params(adapters: dict) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(adapters)))
