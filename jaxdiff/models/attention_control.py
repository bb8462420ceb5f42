"""Attention control: capture, edit and differentiate the UNet's attention probabilities, layer by layer, in jit."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import traverse_util

MAPS = "attention_maps"  # the Flax collection captured probabilities are sown into


@dataclasses.dataclass(frozen=True)
class Layer:
    """Which attention a probability tensor [B, heads, queries, keys] belongs to."""

    name: str  # module path, e.g. "down_blocks_1/attentions_0/transformer_blocks_0/attn2"
    cross: bool  # attn2 (text tokens as keys) or attn1 (self-attention)
    queries: int  # latent positions, h * w
    heads: int

    @property
    def side(self) -> int:
        """The latent resolution (h = w = side for square latents) the queries come from."""
        return math.isqrt(self.queries)


@dataclasses.dataclass(frozen=True)
class Controller:
    edit: Callable | None  # (probs [B, H, Lq, Lk] float32, Layer) -> probs
    capture: bool
    select: Callable  # Layer -> bool: the layers that run explicitly (the others keep the fast path)


_ACTIVE: contextvars.ContextVar[Controller | None] = contextvars.ContextVar("jaxdiff_attention", default=None)


@contextlib.contextmanager
def control(edit: Callable | None = None, capture: bool = False, select: Callable | None = None):
    """While active, every selected attention of a module being traced computes its probabilities explicitly
    (float32 softmax), hands them to `edit(probs, layer)` (whose result is used), and with `capture` sows them into
    the `attention_maps` collection (apply with mutable=[MAPS]). Everything is traced: edits may close over traced
    values (the timestep, a step index) and gradients flow through the probabilities.

    Trace-time state: enter it inside the function being jitted (e.g. in a model wrapper called by the sampling
    loop), not around a call of an already-compiled function, which would not trace again."""
    token = _ACTIVE.set(Controller(edit, capture, select or (lambda layer: True)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def controlling() -> bool:
    """Whether a `control` context is open (attention then runs layer by layer, as named modules)."""
    return _ACTIVE.get() is not None


def active(module, cross: bool, queries: int) -> tuple[Controller, Layer] | None:
    """The controller and layer for an Attention module about to run, or None (the plain fast path)."""
    controller = _ACTIVE.get()
    if controller is None:
        return None
    layer = Layer("/".join(str(p) for p in module.path), cross, queries, module.heads)
    return (controller, layer) if controller.select(layer) else None


def controlled_attention(module, controller: Controller, layer: Layer, q, k, v):
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] through explicit, edited and captured probabilities."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum(
        "bqhd,bkhd->bhqk", q.astype(jnp.float32) * scale, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    probs = jax.nn.softmax(logits, axis=-1)
    if controller.edit is not None:
        probs = controller.edit(probs, layer)
    if controller.capture:
        module.sow(MAPS, "probs", probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.astype(v.dtype)


def apply_with_maps(model, params, *args, edit=None, select=None, **kwargs):
    """One call of `model` (a jaxdiff Model, e.g. the UNet) with attention capture: (output, {layer name: probs})."""
    with control(edit=edit, capture=True, select=select):
        out, state = model.module.apply({"params": params}, *args, mutable=[MAPS], **kwargs)
    flat = traverse_util.flatten_dict(state.get(MAPS, {}), sep="/")
    return out, {name.removesuffix("/probs"): value[0] for name, value in flat.items()}


def token_maps(maps: dict, side: int, token: int, cross_only: bool = True) -> jax.Array:
    """The mean over heads and over every captured layer at latent resolution `side` of the probability given to
    key `token`: [B, side, side] (prompt-to-prompt's aggregated cross-attention map)."""
    picked = [
        p[..., token].mean(axis=1)
        for name, p in maps.items()
        if p.shape[2] == side * side and (not cross_only or name.endswith("attn2"))
    ]
    if not picked:
        raise ValueError(f"no captured {'cross-' if cross_only else ''}attention at {side}x{side}")
    return jnp.mean(jnp.stack(picked), axis=0).reshape(-1, side, side)


class Controlled:
    """A denoiser model(x, t, cond) whose attention is edited at every call of the sampling loop by
    `edit(probs, layer, step, num_steps)`: `step` (traced) is the plan step whose timestep is t (the first, where a
    scheduler repeats one), `num_steps` the plan's length. Prompt-to-prompt-style control inside the compiled loop.

    `edit` may be None (no edit). `record` (Layer -> bool): after each call, `self.captured` holds {layer name:
    probabilities [B, H, queries, keys]} of those layers, before the edit (prompt-to-prompt's attention store). It
    is trace-time state: read it in the same traced step that made the call (a step callback of the loop)."""

    def __init__(self, model, edit: Callable | None, timesteps, select: Callable | None = None, record=None):
        self.model, self.edit, self.timesteps, self.select, self.record = model, edit, timesteps, select, record
        self.captured = {}

    def __call__(self, x, t, cond):
        step = jnp.argmax(self.timesteps == t[0])
        n = self.timesteps.shape[0]
        self.captured = {}

        def hook(probs, layer):
            if self.record is not None and self.record(layer):
                self.captured[layer.name] = probs
            return probs if self.edit is None else self.edit(probs, layer, step, n)

        with control(edit=hook, select=self.select):
            return self.model(x, t, cond)
