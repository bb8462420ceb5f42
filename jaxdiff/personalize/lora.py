"""LoRA on Dense kernels (UNet attention projections by default): init, merge into params, or a side branch at apply.

y = x K + b + m · (α / r) · (x down) up, with down [in, r] and up [r, out] (Flax layout: the transposes of PyTorch's
lora_down / lora_up, as `jaxdiff.erase.adapters`, whose tree layout {module path: {"down", "up"}} this shares so the
two merge identically; they should become one module). `up` starts at zero, so a fresh adapter is the identity.
Init of `down`: "gaussian" N(0, 1/r) (diffusers' DreamBooth-LoRA script) or "kaiming" U(±1/√in) (kohya/PEFT).

`side_branch(apply_fn, adapters, scale)` adds the branch to the adapted Dense layers' outputs at apply time through
`flax.linen.intercept_methods` (no model code changes, params untouched); `merge` adds scale · ΔK to the kernels.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.selectors import flatten, path_str, unflatten

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
    """Adapters {module path: {"down": [in, r], "up": zeros [r, out]}} for the matched kernels (numpy draws, so
    initialising costs no compilation)."""
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


def rank_of(adapters: dict) -> int:
    return int(next(iter(adapters.values()))["down"].shape[-1])


def delta(adapter: dict, scale) -> jax.Array:
    """scale · down @ up: the kernel change [in, out] of one adapter (scale = multiplier · α / r)."""
    return scale * (adapter["down"] @ adapter["up"])


def merge(params, adapters: dict, scale=1.0) -> dict:
    """params with scale · down @ up added to each adapted kernel (scale = multiplier · α / r; may be traced)."""
    flat = flatten(params)
    for name, adapter in adapters.items():
        key = tuple(name.split("/")) + ("kernel",)
        if key not in flat:
            raise KeyError(f"adapter {name} has no kernel in these params")
        flat[key] = (flat[key] + delta(adapter, scale)).astype(flat[key].dtype)
    return unflatten(flat)


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
