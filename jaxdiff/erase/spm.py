"""SPM — concept-SemiPermeable Membrane, "One-dimensional Adapter to Rule Them All" (Lyu et al., CVPR 2024;
Con6924/SPM 3dd762e).

Adapters: rank-1, alpha 1 (scale alpha/rank = 1) LoRA on every Linear/Conv inside every Transformer2DModel of the
UNet (proj_in/proj_out, attn1/attn2 q/k/v/out, ff GEGLU proj and ff out; selector "transformers"), `up`
zero-initialised so the SPM-equipped model equals the original at init (`jaxdiff.lora`, merged into
the kernels). The UNet and the text encoder stay frozen.

Loss (action `erase_with_la`), per iteration:
- x_t: k ~ U{1..N−1} (N = max_denoising_steps = 30), k DDIM steps from noise with the SPM-equipped model (its
  current adapters, no gradient), CFG 3 on the target prompt; then t = timesteps_1000[int(k·1000/N)] (the
  scheduler's 1000-step `set_timesteps`).
- L_erase = MSE(ε_{θ+Δ}(x_t,t,c_tar), sg[ε_θ(x_t,t,c_sur) − η(ε_θ(x_t,t,c_pos) − ε_θ(x_t,t,c_sur))]), η = 1
  (ε_θ: the original model; c_pos = c_tar, c_sur = "" by default).
- Latent anchoring: K = 4 anchors a = s · n̂ · ||c_tar||, n̂ a unit-norm Gaussian sample of c_tar's shape accepted
  with probability 1 − cos(c_tar, n̂) (rejection sampling from 4K candidates; if fewer than K are accepted the
  remaining slots take rejected candidates), s ~ U(0.8, 1.2);
  L_LA = MSE(ε_{θ+Δ}(x_t,t,a), sg ε_θ(x_t,t,a)) over the official anchoring batch (`anchoring_batch`):
  `sample` puts the unconditional embedding u in front of each anchor, [u, a_1, u, a_2, …, u, a_K], and
  `predict_noise` (CFG 1 on the K latents repeated twice) keeps the second half of that batch, so with K = 4 the
  loss runs over (u, a_3, u, a_4): half unconditional, half anchors.
- L = L_erase + λ_LA · L_LA, λ_LA = 1000.

Facilitated Transport (inference): for prompt p and an SPM trained on target(s) c_tar,
γ = max(cos(flatten E(p), flatten E(c_tar)), |tokens(p) ∩ tokens(c_tar)| / |tokens(c_tar)|) · facilitate_factor
(maximised over the SPM's targets). The official code multiplies *both* LoRA factors by γ, so the update is
γ²·ΔW (`ft_power=2`, default, official code); the paper describes γ·ΔW (`ft_power=1`). Several SPMs sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import lora as adapters_lib
from jaxdiff.erase import common, finetune
from jaxdiff.erase.common import Encoded
from jaxdiff.erase.job import Job, Result
from jaxdiff.erase.registry import MethodInfo
from jaxdiff.errors import UserError

SELECTOR = "transformers"
METHOD = MethodInfo(kind="adapter", order=60, selector=SELECTOR)
MATCHING_METRICS = ("clipcos_tokenuni", "clipcos", "tokenuni")


def init_adapters(params, key=None, rank: int = 1):
    """Rank-1 SPM adapters on every Linear/Conv of the transformer blocks, `up` = 0."""
    return adapters_lib.init_by_selector(params, SELECTOR, rank=rank, key=key)


def sample_anchors(key, target, num: int, candidates: int | None = None):
    """SPM's latent-anchoring samples for target [B, L, D] -> [B, num, L, D] (see the module docstring)."""
    b = target.shape[0]
    m = candidates or 4 * num
    k_n, k_u, k_s = jax.random.split(key, 3)
    flat_t = target.reshape(b, -1).astype(jnp.float32)
    norm_t = jnp.linalg.norm(flat_t, axis=-1)
    n = jax.random.normal(k_n, (b, m, flat_t.shape[-1]), jnp.float32)
    n = n / jnp.linalg.norm(n, axis=-1, keepdims=True)
    cos = jnp.einsum("bmd,bd->bm", n, flat_t) / norm_t[:, None]
    accept = jax.random.uniform(k_u, (b, m)) < 1.0 - cos
    order = jnp.argsort(jnp.where(accept, 0, 1), axis=1, stable=True)[:, :num]
    chosen = jnp.take_along_axis(n, order[..., None], axis=1)
    s = jax.random.uniform(k_s, (b, num, 1), jnp.float32, 0.8, 1.2)
    return (s * chosen * norm_t[:, None, None]).reshape(b, num, *target.shape[1:])


def anchoring_batch(x, t, uncond, anchors):
    """The latent-anchoring batch of the official code: (latents, timesteps, contexts) [B·K, ...] for x [B, ...],
    t [B], uncond [B, L, D] and anchors [B, K, L, D].

    Official (`sampling.sample`, `train_util.predict_noise` with guidance 1): contexts [u, a_1, u, a_2, …, u, a_K]
    [2K] against the K repeated latents concatenated twice; the result is the "uncond" half plus 1 × (the "text"
    half − the "uncond" half), i.e. the text half: rows K..2K−1 of the interleaved contexts. Only those rows are
    computed here (the same values, half the UNet calls). Each batch row gets the official batch-1 construction."""
    b, k = anchors.shape[:2]
    u = jnp.broadcast_to(uncond[:, None].astype(anchors.dtype), anchors.shape)
    interleaved = jnp.stack([u, anchors], axis=2).reshape(b, 2 * k, *anchors.shape[2:])
    contexts = interleaved[:, k:].reshape(b * k, *anchors.shape[2:])
    return jnp.repeat(x, k, axis=0), jnp.repeat(t, k, axis=0), contexts


def make_loss(
    model,
    *,
    erase_scale: float = 1.0,
    la_strength: float = 1000.0,
    num_anchors: int = 4,
    max_denoising_steps: int = 30,
    guidance: float = 3.0,
    latent_shape=(64, 64, 4),
    scheduler_config: dict | None = None,
    alpha_over_rank: float = 1.0,
):
    """The SPM loss `loss(adapters, frozen, batch, rng) -> (loss, aux)`; frozen: {"base": θ}; batch:
    {"target", "positive", "surrogate", "uncond"}: contexts [B, L, D]."""
    sched = common.ddim(scheduler_config)
    plan = sched.plan(max_denoising_steps)
    n = max_denoising_steps
    ts_all = jnp.asarray(common.train_timesteps(sched), jnp.float32)
    T = sched.num_train_timesteps

    def loss(adapters, frozen, batch, rng):
        base = jax.lax.stop_gradient(frozen["base"])
        tar, pos, sur, null = batch["target"], batch["positive"], batch["surrogate"], batch["uncond"]
        b = tar.shape[0]
        k_noise, k_depth, k_anchor = jax.random.split(rng, 3)
        x_T = jax.random.normal(k_noise, (b, *latent_shape), jnp.float32)
        depth = jax.random.randint(k_depth, (), 1, n)
        equipped = adapters_lib.merge(base, jax.lax.stop_gradient(adapters), 1.0, alpha_over_rank)
        x = common.partial_sample(model, equipped, sched, plan, x_T, tar, null, guidance, depth)
        t = jnp.broadcast_to(ts_all[(depth * T) // n], (b,))

        xa, ta, anchors = anchoring_batch(x, t, null, sample_anchors(k_anchor, tar, num_anchors))
        # the original model's predictions (surrogate, positive, anchors) in one batched call
        frozen_out = common.eps(
            model, base, jnp.concatenate([x, x, xa]), jnp.concatenate([t, t, ta]), jnp.concatenate([sur, pos, anchors])
        )
        frozen_out = jax.lax.stop_gradient(frozen_out)
        e_sur, e_pos, e_anchor = frozen_out[:b], frozen_out[b : 2 * b], frozen_out[2 * b :]
        target = e_sur - erase_scale * (e_pos - e_sur)

        merged = adapters_lib.merge(base, adapters, 1.0, alpha_over_rank)
        out = common.eps(
            model, merged, jnp.concatenate([x, xa]), jnp.concatenate([t, ta]), jnp.concatenate([tar, anchors])
        )
        l_erase = common.mse(out[:b], target)
        l_la = common.mse(out[b:], e_anchor)
        return l_erase + la_strength * l_la, {"erase": l_erase, "anchor": l_la, "t": jnp.mean(t)}

    return loss


# --------------------------------------------------------------------------------- Facilitated Transport


def transport_gamma(
    prompt: Encoded, i: int, targets: Encoded, metric: str = "clipcos_tokenuni", factor: float = 1.0
) -> float:
    """γ of prompt i against an SPM's target prompt(s) (max over the targets)."""
    if metric not in MATCHING_METRICS:
        raise UserError(f"matching metric must be one of {MATCHING_METRICS}, got {metric!r}")
    p = np.asarray(prompt.emb[i], np.float64).ravel()
    tokens_p = set(prompt.word_ids(i))
    best = 0.0
    for j in range(len(targets)):
        q = np.asarray(targets.emb[j], np.float64).ravel()
        clipcos = float(p @ q / (np.linalg.norm(p) * np.linalg.norm(q)))
        tokens_t = set(targets.word_ids(j))
        tokenuni = len(tokens_p & tokens_t) / max(1, len(tokens_t))
        value = {"clipcos": clipcos, "tokenuni": tokenuni, "clipcos_tokenuni": max(clipcos, tokenuni)}[metric]
        best = max(best, value)
    return best * factor


def apply_spms(params, spms, power: int = 2, alpha_over_rank: float = 1.0):
    """params with several SPMs merged: spms = [(adapters, γ), ...]; each adds γ**power · ΔW (power 2: official
    code, both factors scaled; 1: the paper's γ·ΔW)."""
    return adapters_lib.merge_many(params, [(a, g**power) for a, g in spms], alpha_over_rank)


# ------------------------------------------------------------------------------------------- the method


def run(job: Job) -> Result:
    """SPM: train the adapters; the result merges them, and Facilitated Transport scales them per prompt."""
    o, t = job.config.spm, job.config.train
    alpha_over_rank = float(o.alpha) / int(o.rank)
    loss = make_loss(
        job.model,
        erase_scale=o.erase_scale,
        la_strength=o.la_strength,
        num_anchors=o.num_anchors,
        max_denoising_steps=o.max_denoising_steps,
        guidance=o.guidance,
        latent_shape=job.latent_shape,
        scheduler_config=job.pipe.scheduler_config or None,
        alpha_over_rank=alpha_over_rank,
    )
    # Not the full captions the other fine-tuning methods train on: the official c_tar is the bare target word
    # ("nudity", prompts.yaml), and Facilitated Transport measures every prompt against it.
    target = job.context(job.concept_prompts)
    surrogate = job.context(job.anchor_prompts)
    b = int(t.batch_size)
    nulls = jnp.repeat(job.context([""]), b, axis=0)

    def batch_fn(i):
        idx = finetune.pick(i, target.shape[0], b, job.config.seed)
        return {
            "target": target[idx],
            "positive": target[idx],
            "surrogate": surrogate[idx],
            "uncond": nulls,
        }

    adapters = init_adapters(job.original, jax.random.PRNGKey(job.config.seed), rank=int(o.rank))
    trained, info = finetune.train_unet(job, loss, adapters, {"base": job.original}, batch_fn)
    targets = job.encode(job.concepts)  # Facilitated Transport compares prompts with the SPM's target concept(s)
    merge = jax.jit(lambda base, a, g: apply_spms(base, [(a, g)], int(o.ft_power), alpha_over_rank))

    def params_for_prompt(prompt):
        gamma = transport_gamma(job.encode([prompt]), 0, targets, o.matching_metric, o.facilitate_factor)
        return merge(job.original, trained, jnp.float32(gamma))

    meta = {
        "rank": int(o.rank),
        "alpha": float(o.alpha),
        "ft_power": int(o.ft_power),
        "targets": job.concepts,
        "matching_metric": o.matching_metric,
        "facilitate_factor": float(o.facilitate_factor),
        "parameters": adapters_lib.num_params(trained),
    }
    full = adapters_lib.merge(job.original, trained, 1.0, alpha_over_rank)
    return Result(full, {**info, "adapter_parameters": meta["parameters"]}, params_for_prompt, trained, meta)
