"""Concept Ablation (Kumari et al., ICCV 2023; nupurkmr9/concept-ablation, `diffusers/train.py`).

x_t = sqrt(ā_t)·x0 + sqrt(1 − ā_t)·ε with x0 the latents of anchor images (≈200 generated from the anchor prompt,
e.g. "painting"), t ~ U{0..T−1}; c* is the anchor caption with the target concept inserted, c_anchor the plain
anchor caption of the same image.

- "model-based" (default):  L = || ε_θ(x_t, t, c*) − sg ε_θ(x_t, t, c_anchor) ||²  — the target comes from the
  *current* network (trainable leaves included) under stop-gradient, as the official `torch.no_grad()` call;
- "noise-based": the target is ε.
Both use the official masked reduction: Σ_{h,w,c} m·(pred − target)² / Σ_{h,w} m per sample, averaged over the
batch, with m [B,h,w,1] the valid-region mask of the resize augmentation (all ones by default); note that with
a full mask this is C × the elementwise mean (kept: it sets the weight relative to the prior term).
- prior preservation (optional, `prior_loss_weight`): + w · MSE(ε_θ(x_t^prior, t, c_prior), ε) (mean) on a
  second batch of anchor-class images.

Trainable leaves: "cross-attn-kv" (attn2 to_k/to_v, the default for styles and objects) or "full" (full-weight,
memorised images). Official runs: lr 2e-6 scaled by batch × GPUs (`--scale_lr`), batch 4 on 2 GPUs, 100 steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc

from jaxdiff import selectors
from jaxdiff.erase import common, finetune
from jaxdiff.erase.job import Job, Result
from jaxdiff.erase.registry import MethodInfo
from jaxdiff.errors import UserError
from jaxdiff.sampling.schedulers.common import add_noise

# Trained on images of the anchor (square for circle), which the scorecard picks among the target's kind.
METHOD = MethodInfo(
    kind="finetune", order=80, selector="cross-attn-kv", needs_anchor=True, anchor="other_concept", retention=True
)

LOSS_TYPES = ("model-based", "noise-based")


def masked_loss(pred, target, mask=None):
    """Σ_{h,w,c} m (pred − target)² / Σ_{h,w} m per sample, then the batch mean (official reduction)."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    if mask is None:
        mask = jnp.ones(pred.shape[:3] + (1,), jnp.float32)
    return jnp.mean(jnp.sum(err * mask, axis=(1, 2, 3)) / jnp.sum(mask, axis=(1, 2, 3)))


def make_loss(model, *, loss_type: str = "model-based", prior_loss_weight: float = 1.0, scheduler_config=None):
    """`loss(trainable, frozen, batch, rng) -> (loss, aux)`; frozen: {"base": θ (frozen leaves)}; batch:
    latents [B,h,w,C], target c* [B,L,D], anchor [B,L,D], optional mask [B,h,w,1], optional prior_latents and
    prior (then the prior term is added with `prior_loss_weight`)."""
    if loss_type not in LOSS_TYPES:
        raise UserError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    sched = common.ddim(scheduler_config)
    acp = jnp.asarray(sched.alphas_cumprod)
    T = sched.num_train_timesteps

    def noised(latents, key):
        k_n, k_t = jax.random.split(key)
        noise = jax.random.normal(k_n, latents.shape, jnp.float32)
        t = jax.random.randint(k_t, (latents.shape[0],), 0, T)
        return add_noise(acp, latents.astype(jnp.float32), noise, t), noise, t

    def loss(trainable, frozen, batch, rng):
        base = frozen["base"]
        params = selectors.combine(trainable, base)
        x_t, noise, t = noised(batch["latents"], jax.random.fold_in(rng, 0))
        pred = common.eps(model, params, x_t, t, batch["target"])
        if loss_type == "model-based":
            current = selectors.combine(jax.lax.stop_gradient(trainable), jax.lax.stop_gradient(base))
            target = jax.lax.stop_gradient(common.eps(model, current, x_t, t, batch["anchor"]))
        else:
            target = noise
        value = masked_loss(pred, target, batch.get("mask"))
        aux = {"ablation": value}
        if "prior_latents" in batch:
            xp, noise_p, tp = noised(batch["prior_latents"], jax.random.fold_in(rng, 1))
            prior = common.mse(common.eps(model, params, xp, tp, batch["prior"]), noise_p)
            value = value + prior_loss_weight * prior
            aux["prior"] = prior
        return value, aux

    return loss


# ------------------------------------------------------------------------------------------- the method


def run(job: Job) -> Result:
    """Concept Ablation: fine-tune the concept prompts onto the original model's anchor images."""
    o, t = job.config.ablation, job.config.train
    if o.scale_lr:
        t = mlc.ConfigDict(t.to_dict())
        t.learning_rate = float(t.learning_rate) * int(t.batch_size)
        job.config.unlock()
        job.config.train = t
    loss = make_loss(
        job.model,
        loss_type=o.loss_type,
        prior_loss_weight=o.prior_loss_weight,
        scheduler_config=job.pipe.scheduler_config or None,
    )
    z, target, anchor = job.anchor_data(int(o.num_anchor_images))
    b, n = int(t.batch_size), z.shape[0]

    def batch_fn(i):
        idx = finetune.pick(i, n, b, job.config.seed)
        batch = {"latents": z[idx], "target": target[idx], "anchor": anchor[idx]}
        if o.with_prior:
            jdx = finetune.pick(i, n, b, job.config.seed + 1)
            batch.update(prior_latents=z[jdx], prior=anchor[jdx])
        return batch

    params, info = finetune.train_selected(job, loss, batch_fn)
    return Result(params, {**info, "learning_rate": float(t.learning_rate)})
