"""Training-free feature caches as static sampling schedules: Faster Diffusion, DeepCache and T-GATE, each compiled."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import platforms
from jaxdiff.errors import UserError
from jaxdiff.models.transformer import ATTN_CACHE

# Faster Diffusion (Li et al. 2023, official utils_sd.py): key-step presets as 0-based step indices (0 = noisiest).
# Sets are for the step count in their name; rules ("s2", "pro") apply to any count.
FASTER_PRESETS = {
    "50ls": (50, lambda i: i in (0, 1, 2, 3, 5, 10, 15, 25, 35)),
    "50ls2": (50, lambda i: i in (0, 10, 11, 12, 15, 20, 25, 30, 35, 45)),
    "100ls": (100, lambda i: i > 85 or i < 10 or i % 5 == 0),
    "75ls": (75, lambda i: i > 65 or i < 10 or i % 5 == 0),
    "s2": (None, lambda i: i < 20 or i > 40 or i % 2 == 0),
    "pro": (None, lambda i: math.isqrt(9 + 8 * i) ** 2 == 9 + 8 * i),
}
# Prior noise injection z_t <- z_t + alpha z_T for t < tau (official: 0.003, t / 1000 < 0.5).
FASTER_INJECT_ALPHA = 0.003
FASTER_INJECT_TAU = 500.0
# T-GATE (Liu et al. 2024, official tgate_utils.tgate_scheduler) defaults: self-attention cache intervals before
# (sp) and after (fi) the gate, and the warm-up steps.
TGATE_DEFAULTS = {"sp": 5, "fi": 1, "warmup": 2}
FASTER_DECODE = ("auto", "parallel", "sequential")

USAGE = (
    "faster:<50ls|50ls2|75ls|100ls|s2|pro|everyK|i,j,...>[:inject=ALPHA][:decode=auto|parallel|sequential], "
    "deepcache:N[:branch=B], "
    "tgate:G[:sp=5][:fi=1][:warmup=2]"
)


@dataclasses.dataclass(frozen=True)
class CacheSchedule:
    """What each step computes and reuses; static (hashable), so it selects one compiled program.

    faster: `key[i]` runs the encoder at step i; the non-key steps after it are decoded with it in one batched call
    (`groups`: (start, size) per key step) or, `decode` = "sequential", one decoder call per step (the same
    arithmetic: a non-key step's decoder input is the key step's features and its own timestep, never its latent);
    "auto" picks sequential where the UNet is compiled for a CPU (a batch of k decoder rows costs k rows there: the
    parallel form gains nothing and its large batched call ran slower) and parallel elsewhere (the official form,
    whose gain is a GPU's spare parallelism); `inject[i]`: prior noise injection before the scheduler step i.
    deepcache: `full[i]` runs the whole UNet (and refreshes the cached feature), else the shallow branch `branch`.
    tgate: `attn[i]` = (self-attention mode, cross-attention mode) and `cfg[i]` (guidance rows run) per step.
    """

    method: str
    spec: str
    steps: int
    key: tuple = ()
    inject: tuple = ()
    alpha: float = 0.0
    full: tuple = ()
    branch: int = 0
    attn: tuple = ()
    cfg: tuple = ()
    decode: str = "auto"

    @property
    def groups(self) -> tuple:
        starts = [i for i, k in enumerate(self.key) if k] + [self.steps]
        return tuple((s, e - s) for s, e in zip(starts[:-1], starts[1:]))

    def pattern(self) -> list[str]:
        """One word per step: what the UNet does there (for tests and reports)."""
        if self.method == "faster":
            return [("key" if k else "reuse") + ("+inject" if j else "") for k, j in zip(self.key, self.inject)]
        if self.method == "deepcache":
            return ["full" if f else "shallow" for f in self.full]
        return [f"sa={sa},ca={ca}" + ("" if c else ",nocfg") for (sa, ca), c in zip(self.attn, self.cfg)]

    def encoder_passes(self) -> int:
        """UNet encoder (or full-depth) passes per image batch: the cost the cache saves."""
        if self.method == "faster":
            return sum(self.key)
        if self.method == "deepcache":
            return sum(self.full)
        return self.steps


def _options(parts: list[str], allowed: dict, spec: str) -> dict:
    out = dict(allowed)
    for part in parts:
        name, eq, value = part.partition("=")
        if not eq or name not in allowed:
            raise UserError(f"cache {spec!r}: unknown option {part!r} (options: {', '.join(allowed) or 'none'})")
        try:
            out[name] = type(allowed[name])(value)
        except ValueError:
            raise UserError(f"cache {spec!r}: {name} must be a number, got {value!r}") from None
    return out


def _positive(value, what: str, spec: str) -> int:
    if not re.fullmatch(r"[0-9]+", value or "") or int(value) < 1:
        raise UserError(f"cache {spec!r}: {what} must be a positive integer, got {value!r}")
    return int(value)


def parse(spec: str | None, timesteps, num_skips: int | None = None, use_cfg: bool = True) -> CacheSchedule | None:
    """A CacheSchedule from a cache string (see USAGE) for a run over `timesteps` (the plan's, noisiest first);
    None for None/"none". `num_skips`: the UNet's skip count (DeepCache's branch bound). Bad input: one UserError."""
    if spec is None or spec == "none":
        return None
    if not isinstance(spec, str) or ":" not in spec:
        raise UserError(f"unknown cache {spec!r}; use {USAGE}")
    timesteps = np.asarray(timesteps, np.float64)
    n = len(timesteps)
    method, _, rest = spec.partition(":")
    arg, *parts = rest.split(":")
    if method == "faster":
        opts = _options(parts, {"inject": FASTER_INJECT_ALPHA, "decode": "auto"}, spec)
        if opts["decode"] not in FASTER_DECODE:
            raise UserError(f"cache {spec!r}: decode must be one of {', '.join(FASTER_DECODE)}, got {opts['decode']!r}")
        if arg in FASTER_PRESETS:
            needs, rule = FASTER_PRESETS[arg]
            if needs is not None and needs != n:
                raise UserError(f"cache {spec!r}: preset {arg} is for {needs} steps, this run has {n}")
            key = [bool(rule(i)) for i in range(n)]
        elif arg.startswith("every"):
            k = _positive(arg[5:], "everyK's K", spec)
            key = [i % k == 0 for i in range(n)]
        elif re.fullmatch(r"[0-9]+(,[0-9]+)*", arg):
            steps = sorted({int(s) for s in arg.split(",")})
            if steps[-1] >= n or steps[0] != 0:
                raise UserError(f"cache {spec!r}: key steps must lie in 0..{n - 1} and include 0, got {steps}")
            key = [i in steps for i in range(n)]
        else:
            raise UserError(
                f"cache {spec!r}: unknown Faster Diffusion preset {arg!r} ({', '.join(FASTER_PRESETS)}, "
                "everyK or a list of key steps)"
            )
        key[0] = True
        inject = tuple(bool(opts["inject"] != 0 and t < FASTER_INJECT_TAU) for t in timesteps)
        return CacheSchedule(
            "faster", spec, n, key=tuple(key), inject=inject, alpha=float(opts["inject"]), decode=opts["decode"]
        )
    if method == "deepcache":
        interval = _positive(arg, "the cache interval", spec)
        branch = _options(parts, {"branch": 0}, spec)["branch"]
        if interval > n:
            raise UserError(f"cache {spec!r}: interval {interval} is longer than the run ({n} steps)")
        if branch < 0 or (num_skips is not None and branch >= num_skips):
            raise UserError(f"cache {spec!r}: branch must lie in 0..{(num_skips or 1) - 1} for this UNet")
        return CacheSchedule("deepcache", spec, n, full=tuple(i % interval == 0 for i in range(n)), branch=branch)
    if method == "tgate":
        gate = _positive(arg, "the gate step", spec)
        opts = _options(parts, dict(TGATE_DEFAULTS), spec)
        if gate > n:
            raise UserError(f"cache {spec!r}: gate step {gate} lies outside the run ({n} steps)")
        if opts["sp"] < 1 or opts["fi"] < 1 or opts["warmup"] < 0:
            raise UserError(f"cache {spec!r}: sp and fi must be >= 1, warmup >= 0")
        attn = [tgate_modes(i, gate, use_cfg=use_cfg, **opts) for i in range(n)]
        return CacheSchedule("tgate", spec, n, attn=tuple(attn), cfg=tuple(i < gate for i in range(n)))
    raise UserError(f"unknown cache method {method!r} in {spec!r}; use {USAGE}")


def tgate_modes(i: int, gate: int, sp: int = 5, fi: int = 1, warmup: int = 2, use_cfg: bool = True) -> tuple:
    """(self-attention, cross-attention) cache modes at step i: the official tgate_scheduler(cur_step=i, ...)."""
    mean = "store_mean" if use_cfg else "store"  # keep_shape=False averages the CFG halves
    if i < gate - 1:  # semantics-planning phase
        if i < warmup:
            return ("compute", "compute")
        if i == warmup or i % sp == 0:
            return ("store", "compute")
        return ("reuse", "compute")
    if i == gate - 1:
        return (mean, mean)
    return ("store" if i % fi == 0 else "reuse", "reuse")  # fidelity-improving phase


# ------------------------------------------------------------------------------------------- the compiled loops


@dataclasses.dataclass(frozen=True)
class CachedUNet:
    """A UNet module and its params as the pure functions the caches need; `cond` = (context, added_cond).
    Calling it is the plain model(x, t, cond) of `denoise`."""

    module: object
    params: object

    def _apply(self, *args, module=None, **kwargs):
        return (module or self.module).apply({"params": self.params}, *args, **kwargs)

    def __call__(self, x, t, cond, residuals=None):
        """`residuals`: (down residuals, mid residual) of ControlNets, added where the UNet takes them."""
        if residuals is None:
            return self._apply(x, t, *cond).astype(jnp.float32)
        down, mid = residuals
        return self._apply(x, t, *cond, down_block_additional_residuals=down, mid_block_additional_residual=mid).astype(
            jnp.float32
        )

    def encode(self, x, t, cond):
        return self._apply(x, t, *cond, method="encode")

    def decode(self, features, t, cond):
        return self._apply(features, cond[0], t, cond[1], method="decode").astype(jnp.float32)

    def deep(self, x, t, cond, branch):
        out, feature = self._apply(x, t, *cond, branch=branch, method="deep_feature")
        return out.astype(jnp.float32), feature

    def shallow(self, x, t, cond, feature, branch):
        context, added = cond
        return self._apply(x, t, context, feature, added, branch=branch, method="shallow").astype(jnp.float32)

    def gated(self, x, t, cond, cache, modes):
        """(out, cache) with the transformer blocks' attention cache modes `modes`."""
        module = self.module.clone(attn_cache_mode=modes)
        if modes == ("compute", "compute"):
            return self._apply(x, t, *cond, module=module).astype(jnp.float32), cache
        out, state = module.apply({"params": self.params, ATTN_CACHE: cache}, x, t, *cond, mutable=[ATTN_CACHE])
        return out.astype(jnp.float32), state[ATTN_CACHE]


def _split_key(key):
    if key is None:
        return None, None
    return tuple(jax.random.split(key))


def run(schedule: CacheSchedule, model: CachedUNet, sched, plan, x, cond, uncond, guidance, use_cfg, key, on_step):
    """The whole cached sampling loop from x at step 0 (inside the caller's jit); returns the last latent."""
    if schedule.steps != plan.timesteps.shape[0]:
        raise ValueError(f"cache schedule for {schedule.steps} steps, plan has {plan.timesteps.shape[0]}")
    context = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u]), cond, uncond) if use_cfg else cond
    rows = (lambda a: jnp.concatenate([a, a])) if use_cfg else (lambda a: a)

    def guide(out):
        if not use_cfg:
            return out
        out_cond, out_uncond = jnp.split(out, 2)
        return out_uncond + guidance * (out_cond - out_uncond)

    def tick(i):
        if on_step is not None:
            jax.debug.callback(on_step, i)

    args = (schedule, model, sched, plan, x, context, rows, guide, tick, key)
    if schedule.method == "faster":
        return _faster_sequential(*args) if sequential_decoding(schedule, model) else _faster(*args)
    if schedule.method == "deepcache":
        return _deepcache(*args)
    return _tgate(*args, cond=cond, use_cfg=use_cfg)


def _faster(schedule, model, sched, plan, x, context, rows, guide, tick, key):
    """Encoder propagation: per group, the encoder at its key step, then one decoder call for the whole group."""
    groups = schedule.groups
    sizes = sorted({size for _, size in groups})
    starts = jnp.asarray([s for s, _ in groups], jnp.int32)
    counts = jnp.asarray([size for _, size in groups], jnp.int32)
    branch_of = jnp.asarray([sizes.index(size) for _, size in groups], jnp.int32)
    inject = jnp.asarray(schedule.inject)
    biggest = sizes[-1]
    z_T = x

    def decoder(size):
        def run_decoder(features, start):
            if size == 1:  # the key step alone: its own embedding, as the full UNet call
                out = model.decode(features, None, context)[None]
            else:  # Faster Diffusion's parallel decoding: [size * rows] with per-row timesteps
                t = jax.lax.dynamic_slice(plan.timesteps, (start,), (size,))
                tile = lambda a: None if a is None else jnp.concatenate([a] * size)  # noqa: E731
                batch = features["skips"][0].shape[0]
                feats = {"skips": tuple(map(tile, features["skips"])), "mid": tile(features["mid"]), "emb": None}
                cond = jax.tree_util.tree_map(tile, context)
                out = model.decode(feats, jnp.repeat(t, batch), cond)
                out = out.reshape(size, batch, *out.shape[1:])
            return jnp.pad(out, [(0, biggest - size)] + [(0, 0)] * (out.ndim - 1))

        return run_decoder

    def group(g, state):
        x, carry, key = state
        start = starts[g]
        x_in = rows(sched.scale_model_input(plan, x, start))
        features = model.encode(x_in, jnp.broadcast_to(plan.timesteps[start], (x_in.shape[0],)), context)
        outs = jax.lax.switch(branch_of[g], [decoder(s) for s in sizes], features, start)

        def step(j, state):
            x, carry, key = state
            i = start + j
            key, step_key = _split_key(key)
            x = jnp.where(inject[i], x + schedule.alpha * z_T, x)
            x, carry = sched.step(plan, guide(outs[j]), i, x, carry, step_key)
            tick(i)
            return x, carry, key

        return jax.lax.fori_loop(0, counts[g], step, (x, carry, key))

    carry = sched.init_carry(plan, x)
    return jax.lax.fori_loop(0, len(groups), group, (x, carry, key))[0]


def sequential_decoding(schedule: CacheSchedule, model: CachedUNet) -> bool:
    """Whether Faster Diffusion decodes step by step: `decode`, with "auto" = the UNet's target platform is a CPU."""
    if schedule.decode != "auto":
        return schedule.decode == "sequential"
    return platforms.resolve(getattr(model.module, "platform", None)) == "cpu"


def _faster_sequential(schedule, model, sched, plan, x, context, rows, guide, tick, key):
    """Encoder propagation step by step: the encoder at key steps (refreshing the cached features), the decoder at
    every step on the cached features with the step's own timestep."""
    keys, inject = jnp.asarray(schedule.key), jnp.asarray(schedule.inject)
    z_T = x
    x_rows = rows(x)
    t0 = jnp.broadcast_to(plan.timesteps[0], (x_rows.shape[0],))
    shape = jax.eval_shape(lambda: _features(model.encode(x_rows, t0, context)))

    def body(i, state):
        x, carry, key, features = state
        key, step_key = _split_key(key)
        x_in = rows(sched.scale_model_input(plan, x, i))
        t = jnp.broadcast_to(plan.timesteps[i], (x_in.shape[0],))
        features = jax.lax.cond(keys[i], lambda: _features(model.encode(x_in, t, context)), lambda: features)
        out = model.decode({**features, "emb": None}, t, context)
        x = jnp.where(inject[i], x + schedule.alpha * z_T, x)
        x, carry = sched.step(plan, guide(out), i, x, carry, step_key)
        tick(i)
        return x, carry, key, features

    zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shape)
    return jax.lax.fori_loop(0, schedule.steps, body, (x, sched.init_carry(plan, x), key, zeros))[0]


def _features(encoded: dict) -> dict:
    """The encoder's output without its time embedding (each step's decoder computes its own)."""
    return {"skips": tuple(encoded["skips"]), "mid": encoded["mid"]}


def _deepcache(schedule, model, sched, plan, x, context, rows, guide, tick, key):
    """Full UNet every N steps (refreshing the deep feature), the shallow branch in between."""
    full = jnp.asarray(schedule.full)
    branch = schedule.branch
    x_rows = rows(x)
    t0 = jnp.broadcast_to(plan.timesteps[0], (x_rows.shape[0],))
    shape = jax.eval_shape(lambda: model.deep(x_rows, t0, context, branch)[1])

    def body(i, state):
        x, carry, key, feature = state
        key, step_key = _split_key(key)
        x_in = rows(sched.scale_model_input(plan, x, i))
        t = jnp.broadcast_to(plan.timesteps[i], (x_in.shape[0],))
        out, feature = jax.lax.cond(
            full[i],
            lambda: model.deep(x_in, t, context, branch),
            lambda: (model.shallow(x_in, t, context, feature, branch), feature),
        )
        x, carry = sched.step(plan, guide(out), i, x, carry, step_key)
        tick(i)
        return x, carry, key, feature

    state = (x, sched.init_carry(plan, x), key, jnp.zeros(shape.shape, shape.dtype))
    return jax.lax.fori_loop(0, schedule.steps, body, state)[0]


def _tgate(schedule, model, sched, plan, x, context, rows, guide, tick, key, *, cond, use_cfg):
    """Before the gate: CFG rows, self-attention cached every `sp` steps; at the gate step (gate - 1) both
    attentions are kept as the mean of the CFG halves; after it: no CFG, cross-attention reused."""
    gate = sum(schedule.cfg)
    carry = sched.init_carry(plan, x)

    def phase(x, carry, key, cache, lo, hi, ctx, rows, guide):
        modes = sorted(set(schedule.attn[lo:hi]))
        which = jnp.asarray([modes.index(m) if lo <= i < hi else 0 for i, m in enumerate(schedule.attn)], jnp.int32)

        def body(i, state):
            x, carry, key, cache = state
            key, step_key = _split_key(key)
            x_in = rows(sched.scale_model_input(plan, x, i))
            t = jnp.broadcast_to(plan.timesteps[i], (x_in.shape[0],))
            branches = [lambda c, m=m: model.gated(x_in, t, ctx, c, m) for m in modes]
            out, cache = jax.lax.switch(which[i], branches, cache) if len(modes) > 1 else branches[0](cache)
            x, carry = sched.step(plan, guide(out), i, x, carry, step_key)
            tick(i)
            return x, carry, key, cache

        return jax.lax.fori_loop(lo, hi, body, (x, carry, key, cache))

    # Phase 1 (steps 0 .. gate - 2): the self-attention cache has the CFG rows' shape.
    x_rows = rows(x)
    t0 = jnp.broadcast_to(plan.timesteps[0], (x_rows.shape[0],))
    first = sorted(set(schedule.attn[: gate - 1]))
    cache = {}
    if any(m[0] != "compute" for m in first):
        shapes = jax.eval_shape(lambda: model.gated(x_rows, t0, context, {}, ("store", "compute"))[1])
        cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    if gate > 1:
        x, carry, key, cache = phase(x, carry, key, cache, 0, gate - 1, context, rows, guide)
    # The gate step: both attentions computed with CFG, kept as the halves' mean (keep_shape=False).
    key, step_key = _split_key(key)
    x_in = rows(sched.scale_model_input(plan, x, gate - 1))
    t = jnp.broadcast_to(plan.timesteps[gate - 1], (x_in.shape[0],))
    out, cache = model.gated(x_in, t, context, cache, schedule.attn[gate - 1])
    x, carry = sched.step(plan, guide(out), gate - 1, x, carry, step_key)
    tick(gate - 1)
    # Phase 2 (steps gate .. end): the prompts' rows only, no guidance; cross-attention from the cache.
    if gate < schedule.steps:
        x, carry, key, cache = phase(x, carry, key, cache, gate, schedule.steps, cond, lambda a: a, lambda o: o)
    return x
