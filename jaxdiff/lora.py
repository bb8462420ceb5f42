"""LoRA adapters on the Dense/Conv kernels of a param tree, shared by erasure (SPM) and personalization.

An adapter on a layer with kernel K adds ΔK = scale · down ⊗ up (scale = multiplier · α / r):
- Dense kernel [in, out] (Flax layout, the transpose of PyTorch's W): down [in, r], up [r, out], ΔK = down @ up;
- Conv kernel [kh, kw, in, out]: down [kh, kw, in, r] (a conv with the layer's own kernel size, as SPM/LoRA's
  `lora_down`), up [r, out] (a 1x1 conv), ΔK[h, w] = down[h, w] @ up.
Both are exactly the forward of a LoRA branch `up(down(x))` added to the layer (up is linear and 1x1), so `merge`
gives the adapted model as ordinary params (no model code changes), and `side_branch` adds the branch to the Dense
layers' outputs at apply time instead (params untouched). `up` starts at zero: a fresh adapter is the identity.

Adapters are a dict {module path "a/b/c": {"down": ..., "up": ...}}: a pytree that trains with optax, stored flat
as "<module path>/down" and "/up" (`to_flat` / `from_flat`). Two initialisations: `init_by_selector` (any kernels
picked by a `jaxdiff.selectors` selector, `down` Kaiming-uniform U(±1/√fan_in) from a JAX key: PyTorch's default,
as SPM) and `init` (Dense kernels whose path matches a regex, numpy draws: "gaussian" N(0, 1/r) as diffusers'
DreamBooth-LoRA script, or "kaiming" as kohya/PEFT).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.selectors import flatten, path_str, selected_paths, unflatten

# diffusers' train_dreambooth_lora.py UNet targets (to_k, to_q, to_v, to_out.0) in attn1 and attn2.
ATTENTION = r"attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$"


def targets(params, pattern: str = ATTENTION) -> list[str]:
    """Module paths "a/b/c" of the 2-D kernels whose "a/b/c/kernel" path matches `pattern`."""
    rx = re.compile(pattern)
    out = [path_str(p[:-1]) for p, v in flatten(params).items() if p[-1] == "kernel" and v.ndim == 2]
    out = [m for m in out if rx.search(m + "/kernel")]
    if not out:
        raise ValueError(f"LoRA target pattern {pattern!r} matches no Dense kernel")
    return out


def init(params, pattern: str = ATTENTION, rank: int = 4, init: str = "gaussian", seed: int = 0) -> dict:
    """Adapters {module path: {"down": [in, r], "up": zeros [r, out]}} for the Dense kernels matching `pattern`
    (numpy draws, so initialising costs no compilation)."""
    flat = flatten(params)
    rng = np.random.default_rng([seed, 53])
    out = {}
    for name in targets(params, pattern):
        fan_in, fan_out = flat[tuple(name.split("/")) + ("kernel",)].shape
        if init == "gaussian":
            down = rng.standard_normal((fan_in, rank)) / rank
        elif init == "kaiming":
            down = rng.uniform(-1.0, 1.0, (fan_in, rank)) / np.sqrt(fan_in)
        else:
            raise ValueError(f"unknown LoRA init {init!r}: gaussian or kaiming")
        out[name] = {"down": jnp.asarray(down, jnp.float32), "up": jnp.zeros((rank, fan_out), jnp.float32)}
    return out


def init_by_selector(params, selector="transformers", rank: int = 1, key=None) -> dict:
    """Adapters (zero `up`, Kaiming-uniform `down`) for every Dense/Conv kernel chosen by `selector`."""
    from jaxdiff.erase.common import run_once

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


def rank_of(adapters: dict) -> int:
    return int(next(iter(adapters.values()))["down"].shape[-1])


def delta(adapter: dict, scale=1.0):
    """scale · down ⊗ up: one adapter's kernel change, in the kernel's layout."""
    return scale * jnp.tensordot(adapter["down"], adapter["up"], axes=1)


def merge_many(params, adapter_sets: Sequence[tuple[dict, object]], alpha_over_rank: float = 1.0):
    """params with Σ_s scale_s · α/r · ΔK_s added to each adapted kernel; adapter_sets = [(adapters, scale), ...]
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
    """params with scale · α/r · down ⊗ up added to every adapted kernel (scale may be traced)."""
    return merge_many(params, [(adapters, scale)], alpha_over_rank)


def side_branch(apply_fn: Callable, adapters: dict, scale=1.0) -> Callable:
    """`apply_fn(params, *args)` with `scale · (x down) up` added to the output of every adapted Dense layer, matched
    by its module path inside the applied module (the adapters' keys)."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        adapter = adapters.get("/".join(context.module.path))
        if adapter is None:
            return out
        x = args[0].astype(jnp.float32)
        return out + (scale * ((x @ adapter["down"]) @ adapter["up"])).astype(out.dtype)

    def wrapped(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return apply_fn(*args, **kwargs)

    return wrapped


def num_params(adapters: dict) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(adapters)))


def to_flat(adapters: dict) -> dict[str, np.ndarray]:
    """{"<module path>/down": array, ...} for a safetensors file."""
    return {f"{name}/{k}": np.asarray(v, np.float32) for name, a in adapters.items() for k, v in a.items()}


def from_flat(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        name, _, part = key.rpartition("/")
        if part not in ("down", "up") or not name:
            raise ValueError(f"not a jaxdiff LoRA key: {key!r} (expected '<module path>/down' or '/up')")
        out.setdefault(name, {})[part] = jnp.asarray(value, jnp.float32)
    bad = [n for n, a in out.items() if set(a) != {"down", "up"}]
    if bad:
        raise ValueError(f"LoRA modules without both down and up: {bad}")
    return out
