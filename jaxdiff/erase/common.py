"""Pieces shared by the erasure methods: prompt encodings with token bookkeeping, model calls, x̂0, partial DDIM.

Which leaves train (named selectors, the frozen/trainable split) is `jaxdiff.selectors`; the guided sampling loop
is `jaxdiff.sampling.denoise`, wrapped here for the objectives (float32, no gradient).

Conventions used by every fine-tuning objective in `jaxdiff.erase`:

- An objective is built by `make_loss(model, ...)` and is a pure function
  `loss(trainable, frozen, batch, rng) -> (scalar loss, aux dict)`, differentiable in `trainable` only.
- `trainable` holds only the selected leaves of the UNet param tree (nested dicts, same paths as the full tree),
  `frozen["base"]` is the full tree of the original, frozen model θ*. The trained model is
  `selectors.combine(trainable, frozen["base"])`: its unselected leaves never change, so they are read from θ*.
- Images/latents are NHWC; contexts are text-encoder hidden states [B, L, D].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import selectors
from jaxdiff.sampling.denoise import denoise
from jaxdiff.sampling.schedulers import make_scheduler
from jaxdiff.sampling.schedulers.common import spaced_timesteps

# The scheduler_config.json of runwayml/stable-diffusion-v1-5 (PNDM there; the same betas drive DDIM/DDPM here).
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)

# erase/finetune.py and the methods' fine-tuning runners (each module's `run`) reach these through this module.
split, combine, flatten, unflatten = selectors.split, selectors.combine, selectors.flatten, selectors.unflatten

# XLA options for programs that run once (initialisers): unoptimised code compiles ~10x faster on CPU, where
# optimising jax.random's threefry alone takes over a second per draw.
ONE_OFF = {"xla_backend_optimization_level": 0}


def run_once(fn, *args):
    """Run an initialiser compiled with ONE_OFF options; inside a trace (jit / eval_shape), where JAX refuses
    compiler options on nested jits, it is simply called."""
    try:
        return jax.jit(fn, compiler_options=ONE_OFF)(*args)
    except ValueError as err:
        if "compiler_options" not in str(err):
            raise
        return fn(*args)


# ------------------------------------------------------------------------------------- prompt encodings


@dataclasses.dataclass
class Encoded:
    """Text-encoder outputs of a list of prompts with the token bookkeeping the closed-form methods need.

    emb [B, L, D] float32 hidden states (what the UNet cross-attends to); ids [B, L] padded token ids;
    lengths [B]: real tokens including BOS and the first EOS (= the tokenizer's attention_mask.sum()), so the
    last word token sits at lengths - 2 and the first [EoT] at lengths - 1.
    """

    emb: jax.Array
    ids: np.ndarray
    lengths: np.ndarray
    prompts: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.emb.shape[0])

    def __getitem__(self, index) -> Encoded:
        index = np.atleast_1d(np.arange(len(self))[index])
        return Encoded(
            self.emb[index],
            self.ids[index],
            self.lengths[index],
            tuple(self.prompts[i] for i in index) if self.prompts else (),
        )

    @staticmethod
    def concat(parts: Sequence[Encoded]) -> Encoded:
        return Encoded(
            jnp.concatenate([p.emb for p in parts]),
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.lengths for p in parts]),
            sum((tuple(p.prompts) for p in parts), ()),
        )

    def word_ids(self, i: int) -> list[int]:
        """Token ids of prompt i without BOS/EOS/padding."""
        return [int(x) for x in self.ids[i, 1 : int(self.lengths[i]) - 1]]


def encode(pipe, prompts: Sequence[str], params=None) -> Encoded:
    """Encode prompts with a `jaxdiff.sampling.pipeline.Pipeline` (SD 1.x/2.x: its one text encoder)."""
    from jaxdiff.sampling import text

    prompts = list(prompts)
    emb, _ = pipe.encode_prompts(prompts, params)
    tok = pipe.tokenizers[0]
    ids = text.tokenize(tok, prompts)
    lengths = np.array([min(len(tok(p).input_ids), ids.shape[1]) for p in prompts], np.int32)
    return Encoded(jnp.asarray(emb, jnp.float32), ids, lengths, tuple(prompts))


def find_matching_indices(old: Sequence[int], new: Sequence[int]) -> tuple[list[int], list[int]]:
    """MACE's `find_matching_indices`: positions of the common prefix and the common suffix of two token
    sequences (unpadded, BOS/EOS included), i.e. everything but the span where they differ."""
    start = 0
    for a, b in zip(old, new):
        if a != b:
            break
        start += 1
    eo, en = len(old) - 1, len(new) - 1
    while eo >= start and en >= start and old[eo] == new[en]:
        eo -= 1
        en -= 1
    return list(range(start)) + list(range(eo + 1, len(old))), list(range(start)) + list(range(en + 1, len(new)))


def residual_token_pairs(old_ids: Sequence[int], new_ids: Sequence[int], length: int) -> tuple[list[int], list[int]]:
    """MACE's residual tokens extended to the padded length (`prepare_k_v`): matching positions, then the
    padding/EoT copies of both prompts aligned from the end of the longer one."""
    oi, ni = find_matching_indices(old_ids, new_ids)
    if oi[-1] >= ni[-1]:
        return oi + list(range(oi[-1] + 1, length)), ni + list(range(ni[-1] + 1, length - (oi[-1] - ni[-1])))
    return oi + list(range(oi[-1] + 1, length - (ni[-1] - oi[-1]))), ni + list(range(ni[-1] + 1, length))


EDIT_TOKEN_MODES = ("last_word", "eot", "last_word_to_end", "all", "residual")
PRESERVE_TOKEN_MODES = ("last_word", "eot", "nonpad", "all")


def pair_token_indices(old: Encoded, i: int, new: Encoded, j: int, mode: str) -> tuple[list[int], list[int]]:
    """Aligned token positions (in prompt i of `old`, prompt j of `new`) whose old embedding is mapped onto
    the new one's projection. Modes:
    last_word: the last word token of each (UCE current code; "" gives BOS);
    eot: the first [EoT] of each (TRCE's mapped token);
    last_word_to_end: UCE paper-era slices from the last word to the end, trimmed to equal length;
    all: every position, aligned (RECE);
    residual: MACE's residual tokens (common prefix/suffix plus the aligned padding tail)."""
    L = old.emb.shape[1]
    lo, ln = int(old.lengths[i]), int(new.lengths[j])
    if mode == "last_word":
        return [lo - 2], [ln - 2]
    if mode == "eot":
        return [lo - 1], [ln - 1]
    if mode == "last_word_to_end":
        fo, fn = lo - 2, ln - 2
        far = max(fo, fn)
        return list(range(fo, L - max(0, far - fo))), list(range(fn, L - max(0, far - fn)))
    if mode == "all":
        return list(range(L)), list(range(L))
    if mode == "residual":
        return residual_token_pairs(old.ids[i, :lo].tolist(), new.ids[j, :ln].tolist(), L)
    raise ValueError(f"unknown edit token mode {mode!r}; choose from {EDIT_TOKEN_MODES}")


def token_indices(enc: Encoded, i: int, mode: str) -> list[int]:
    """Positions of prompt i used as preserved contexts: last_word, eot, nonpad (BOS..first EOS) or all."""
    n = int(enc.lengths[i])
    if mode == "last_word":
        return [n - 2]
    if mode == "eot":
        return [n - 1]
    if mode == "nonpad":
        return list(range(n))
    if mode == "all":
        return list(range(enc.emb.shape[1]))
    raise ValueError(f"unknown preserve token mode {mode!r}; choose from {PRESERVE_TOKEN_MODES}")


# ------------------------------------------------------------------------------------------ model calls


def eps(model, params, x, t, context):
    """UNet noise prediction in float32; t is broadcast to the batch."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    return model.apply(params, x, t, context).astype(jnp.float32)


def eps_many(model, params, x, t, contexts: Sequence):
    """eps for several contexts at the same (x, t) in one batched call; returns a list."""
    n = len(contexts)
    out = eps(
        model,
        params,
        jnp.concatenate([x] * n),
        jnp.concatenate([jnp.broadcast_to(t, (x.shape[0],))] * n),
        jnp.concatenate(contexts),
    )
    return jnp.split(out, n)


def mse(a, b):
    """torch.nn.MSELoss: mean over all elements."""
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def expand(v, x):
    v = jnp.ravel(v)
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def predict_x0(alphas_cumprod, x_t, eps_pred, t):
    """x̂0 = (x_t - sqrt(1 - ā_t) eps) / sqrt(ā_t) at integer timesteps t [B] (DDPM pred_original_sample)."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(t, jnp.int32)]
    return (x_t - expand(jnp.sqrt(1 - a), x_t) * eps_pred) / expand(jnp.sqrt(a), x_t)


def ddim(scheduler_config: dict | None = None):
    """A deterministic DDIM (eta 0) for partial sampling; SD's scheduler config by default."""
    return make_scheduler("ddim", dict(SD_SCHEDULER if scheduler_config is None else scheduler_config), eta=0.0)


def train_timesteps(sched, count: int | None = None) -> np.ndarray:
    """`scheduler.set_timesteps(count)` of the scheduler's own spacing (default: every training timestep),
    e.g. SPM's `timesteps_1000`."""
    c = sched.config
    n = sched.num_train_timesteps if count is None else count
    return spaced_timesteps(c["timestep_spacing"], sched.num_train_timesteps, n, c.get("steps_offset", 0))


def _frozen_eps(model, params):
    """eps of params that sampling never differentiates through."""
    params = jax.lax.stop_gradient(params)
    return lambda x, t, context: eps(model, params, x, t, context)


def partial_sample(model, params, sched, plan, x_T, cond, uncond, guidance: float, n_steps):
    """The first `n_steps` steps of `plan` (DDIM) from x_T with classifier-free guidance on `cond`, in float32 with
    no gradient (`jaxdiff.sampling.denoise` inside the caller's jit; n_steps may be traced).

    After n steps the latent sits at plan.timesteps[n] (n < len(plan)), or is fully denoised (n == len(plan)).
    """
    x = denoise(
        _frozen_eps(model, params),
        sched,
        plan,
        x_T.astype(jnp.float32),
        cond,
        uncond,
        guidance,
        end=n_steps,
    )
    return jax.lax.stop_gradient(x)


def ddim_trajectory(model, params, sched, plan, x_T, cond, uncond, guidance: float):
    """Full DDIM sampling recorded per step (TRCE's stage-2 data): (x_before [N, B, ...], x_after [N, B, ...],
    eps [N, B, ...], timesteps [N]); x_after[k] is the latent after step k (TRCE stores that one with t_k)."""
    _, trajectory = denoise(
        _frozen_eps(model, params),
        sched,
        plan,
        x_T.astype(jnp.float32),
        cond,
        uncond,
        guidance,
        record=True,
    )
    return tuple(trajectory)


def broadcast_context(c, batch: int):
    """[L, D] or [1, L, D] or [B, L, D] -> [B, L, D]."""
    c = jnp.asarray(c, jnp.float32)
    if c.ndim == 2:
        c = c[None]
    return jnp.broadcast_to(c, (batch,) + c.shape[1:])
