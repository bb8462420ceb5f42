"""The guided denoising loop: classifier-free guidance and a scheduler's steps start..end, traced into one program."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Trajectory(NamedTuple):
    """What `denoise(..., record=True)` saw at each step k of start..end (leading axis end - start): the latent fed
    to the step (at timesteps[k]), the latent after it, the guided model output, and the step's timestep."""

    before: jax.Array
    after: jax.Array
    prediction: jax.Array
    timesteps: jax.Array


def _guidance_is_one(guidance) -> bool:
    """True for a concrete guidance of exactly 1, where CFG reduces to the conditional prediction."""
    if isinstance(guidance, jax.core.Tracer):
        return False
    return float(guidance) == 1.0


def denoise(
    model: Callable,
    sched,
    plan,
    x,
    cond,
    uncond=None,
    guidance=1.0,
    *,
    start=0,
    end=None,
    key=None,
    record: bool = False,
    on_step: Callable | None = None,
    cache=None,
    after_step: Callable | None = None,
    step_callback: Callable | None = None,
    callback_state=None,
):
    """Steps `start`..`end` (default: to the end) of `plan` from the latent `x` (at plan.timesteps[start]); call it
    inside the caller's jit: the loop is one `lax.fori_loop` (`lax.scan` when recording), with no host round-trip
    unless `on_step` is given.

    model(x, t [B], cond) -> prediction [B, ...]: the denoiser with its params closed over; `cond` is any pytree of
    per-row conditioning (a context [B, L, D], or (context, added_cond)). With `uncond` (same structure) the model
    runs once per step on the cond and uncond rows together and classifier-free guidance combines them,
    uncond + guidance * (cond - uncond); without it, or with a concrete guidance of exactly 1, only `cond` runs.
    `guidance` may be traced. `key`: split once per step for stochastic schedulers (DDPM, DDIM with eta > 0).
    Multistep schedulers (PNDM, DPM-Solver) start their history afresh at `start`.

    Returns the latent after step end - 1 or, with `record` (start and end then static), (latent, Trajectory).
    `start`/`end` may be traced without `record` (the loop becomes a while loop).

    `cache`: a `jaxdiff.sampling.cache.CacheSchedule` (Faster Diffusion, DeepCache, T-GATE); `model` must then be a
    `cache.CachedUNet` and the run whole (start 0, no record).

    `step_callback(step, latents, state) -> (latents, state)`: a pure per-step hook traced into the loop after each
    step (after `after_step`); its state, a pytree starting as `callback_state`, is carried by the loop, and denoise
    then returns (latent, final state). Not with `record` or `cache`."""
    end = plan.timesteps.shape[0] if end is None else end
    use_cfg = uncond is not None and not _guidance_is_one(guidance)
    if cache is not None:
        from jaxdiff.sampling import cache as cache_lib

        if record or not (isinstance(start, int) and start == 0) or end != plan.timesteps.shape[0]:
            raise ValueError("a cache schedule runs the whole plan: no start/end/record")
        if after_step is not None or step_callback is not None:
            raise ValueError("a cache schedule takes no after_step hook or step_callback")
        return cache_lib.run(cache, model, sched, plan, x, cond, uncond, guidance, use_cfg, key, on_step)
    # Concatenated once, outside the loop: each step makes one model call on [cond; uncond] rows.
    context = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u]), cond, uncond) if use_cfg else cond

    def step(i, x, carry, key):
        step_key = None
        if key is not None:
            key, step_key = jax.random.split(key)
        x_in = sched.scale_model_input(plan, x, i)
        model_in = jnp.concatenate([x_in, x_in]) if use_cfg else x_in
        t = jnp.broadcast_to(plan.timesteps[i], (model_in.shape[0],))
        out = model(model_in, t, context)
        if use_cfg:
            out_cond, out_uncond = jnp.split(out, 2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        x_next, carry = sched.step(plan, out, i, x, carry, step_key)
        if after_step is not None:
            x_next = after_step(i, x_next)
        if on_step is not None:
            jax.debug.callback(on_step, i)
        return x_next, carry, key, out

    carry = sched.init_carry(plan, x)
    if not record:

        def body(i, state):
            x, carry, key, hook_state = state
            x, carry, key, _ = step(i, x, carry, key)
            if step_callback is not None:
                x, hook_state = step_callback(i, x, hook_state)
            return x, carry, key, hook_state

        x, _, _, hook_state = jax.lax.fori_loop(start, end, body, (x, carry, key, callback_state))
        return x if step_callback is None else (x, hook_state)
    if step_callback is not None:
        raise ValueError("a step_callback cannot be combined with record")

    if not (isinstance(start, (int, np.integer)) and isinstance(end, (int, np.integer))):
        raise TypeError(f"recording needs static start and end (Python ints), got {start!r} and {end!r}")

    def scan_body(state, i):
        x, carry, key = state
        x_next, carry, key, out = step(i, x, carry, key)
        return (x_next, carry, key), (x, x_next, out)

    (x, _, _), (before, after, prediction) = jax.lax.scan(scan_body, (x, carry, key), jnp.arange(int(start), int(end)))
    return x, Trajectory(before, after, prediction, plan.timesteps[start:end])


def stage_index(t, num_stages: int, num_train_timesteps: int = 1000):
    """ProSpect's stage of timesteps t: k = floor(t·K / T) (`cond[int(t * K / 1000)]`), clipped to 0..K−1; k = 0 is
    the end of generation (t < T/K), k = K−1 its start."""
    k = jnp.floor(jnp.asarray(t, jnp.float32) * num_stages / num_train_timesteps).astype(jnp.int32)
    return jnp.clip(k, 0, num_stages - 1)


class Staged:
    """A denoiser model(x, t, cond) whose context holds K stages per row, [B, K, L, D] (batch first, so CFG's
    concatenation of cond and uncond rows is unchanged): each call gives the model row b's stage
    `stage_index(t[b], K, T)`, [B, L, D]. cond is a context or (context, added)."""

    def __init__(self, model, num_train_timesteps: int = 1000):
        self.model, self.num_train = model, num_train_timesteps

    def __call__(self, x, t, cond):
        context = cond[0] if isinstance(cond, tuple) else cond
        k = stage_index(t, context.shape[1], self.num_train)
        context = context[jnp.arange(context.shape[0]), k]
        return self.model(x, t, (context,) + tuple(cond[1:]) if isinstance(cond, tuple) else context)


class StepCallback:
    """A per-step latent hook for `pipe(prompts, step_callback=...)` (prompt-to-prompt's `step_callback`): pure,
    hashable (one compiled program per callback object; a frozen dataclass) and traced into the pipeline's one
    compiled loop, arrays only. Subclass it and override what you need; the defaults change nothing.

    - `capture(layer) -> bool`: the attentions (`attention_control.Layer`) whose probabilities the callback sees
      (computed explicitly; without an `attention_edit` the other layers keep the fast path).
    - `init(latents) -> state`: the callback's state (a pytree of arrays) before the first step.
    - `__call__(latents, step, num_steps, captures, state) -> (latents, state)`: after each step, the latents
      [B, h, w, C] after the step, the plan step (traced), the plan's length, and {layer name: probabilities
      [B, heads, queries, keys]} of this step's UNet call for the prompts' (conditional) rows, before any
      attention edit."""

    def capture(self, layer) -> bool:
        return False

    def init(self, latents):
        return ()

    def __call__(self, latents, step, num_steps, captures, state):
        return latents, state
