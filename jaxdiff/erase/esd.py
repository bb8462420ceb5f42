"""ESD — Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023; rohitgandikota/erasing).

Objective (negative guidance; sign convention of the spec and of both official codes):

    target(x_t, t) = ε*(x_t, t, ∅) − η · [ε*(x_t, t, c) − ε*(x_t, t, ∅)]
    L_ESD(θ)      = mean_elements (ε_θ(x_t, t, c) − sg(target))²

i.e. the frozen model's unconditional prediction pushed *away* from the concept direction by η ("negative
guidance"), both ε* terms from the frozen original θ*, only ε_θ(x_t, t, c) trainable. The "erase-from"
variant (new code, `--erase_from`) uses a source concept c_f as base and input:
target = ε*(c_f) − η(ε*(c) − ε*(∅)), prediction ε_θ(x_t, t, c_f), and samples x_t from c_f.

x_t comes from partial DDIM sampling (η_DDIM = 0, classifier-free guidance `start_guidance` on c) inside a
compiled `lax.fori_loop`, from noise up to a random step; two conventions (`timestep_mode`):
- "compvis" (paper code `train-esd.py` + CompVis `ddim.py`): t_enc ~ U{0..N−1}; the sampler runs DDIM indices
  N−1 … t_enc−1 and breaks after index t_enc−1 (N steps, i.e. fully denoised, when t_enc ∈ {0, 1}); the ε terms
  are evaluated at t_ddpm ~ U{round(T·t_enc/N), …, round(T·(t_enc+1)/N) − 1} (so x_t is ~2 DDIM steps less noisy
  than t says: kept as in the official code);
- "diffusers" (new code `esd_sd.py`): k ~ U{0..N−1}, the first k steps of the plan are run and the ε terms are
  evaluated exactly at plan.timesteps[k].
`sampler` chooses who generates x_t: "trainee" (paper code: the model being trained, under no_grad) or
"frozen" (new code: the original model). Defaults follow the paper code: compvis, trainee, η 1, CFG 3, DDIM 50.

Trainable leaves (names of `jaxdiff.selectors.SELECTORS`): esd-x (attn2 Linear modules), esd-u (every Linear/Conv
outside attn2), esd-all, esd-x-strict (attn2 to_k/to_v); or the old code's xattn / noxattn / selfattn / full /
notime.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff import selectors
from jaxdiff.erase import common, finetune
from jaxdiff.erase.job import Job, Result
from jaxdiff.erase.registry import MethodInfo
from jaxdiff.errors import UserError

METHOD = MethodInfo(kind="finetune", order=50, selector="esd-x", retention=True)

SAMPLERS = ("trainee", "frozen")
TIMESTEP_MODES = ("compvis", "diffusers")


def esd_target(e_null, e_cond, eta, e_base=None):
    """ε*(c_base) − η (ε*(c) − ε*(∅)); c_base = ∅ unless erasing *from* a source concept."""
    base = e_null if e_base is None else e_base
    return base - eta * (e_cond - e_null)


def compvis_steps(t_enc, num_steps: int):
    """DDIM steps the CompVis sampler runs before `till_T = t_enc` stops it (N when t_enc is 0 or 1)."""
    return jnp.where(t_enc == 0, num_steps, jnp.minimum(num_steps, num_steps + 1 - t_enc))


def make_loss(
    model,
    *,
    negative_guidance: float = 1.0,
    start_guidance: float = 3.0,
    ddim_steps: int = 50,
    sampler: str = "trainee",
    timestep_mode: str = "compvis",
    latent_shape=(64, 64, 4),
    scheduler_config: dict | None = None,
):
    """The ESD loss `loss(trainable, frozen, batch, rng) -> (loss, aux)`.

    frozen: {"base": θ* (full tree)}; batch: {"cond": c [B, L, D], "uncond": ∅ [B, L, D], optional "from": c_f};
    rng draws x_T, the sampling depth and t."""
    if sampler not in SAMPLERS:
        raise UserError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if timestep_mode not in TIMESTEP_MODES:
        raise UserError(f"timestep_mode must be one of {TIMESTEP_MODES}, got {timestep_mode!r}")
    sched = common.ddim(scheduler_config)
    plan = sched.plan(ddim_steps)
    T = sched.num_train_timesteps
    n = ddim_steps
    timesteps = plan.timesteps

    def loss(trainable, frozen, batch, rng):
        base = frozen["base"]
        cond, null = batch["cond"], batch["uncond"]
        source = batch.get("from")
        b = cond.shape[0]
        k_noise, k_depth, k_t = jax.random.split(rng, 3)
        x_T = jax.random.normal(k_noise, (b, *latent_shape), jnp.float32)
        depth = jax.random.randint(k_depth, (), 0, n)
        sampling_params = selectors.combine(jax.lax.stop_gradient(trainable), base) if sampler == "trainee" else base
        prompt = cond if source is None else source
        if timestep_mode == "compvis":
            steps = compvis_steps(depth, n)
            lo = jnp.round(T * depth / n).astype(jnp.int32)
            hi = jnp.round(T * (depth + 1) / n).astype(jnp.int32)
            t = jax.random.randint(k_t, (b,), lo, hi).astype(jnp.float32)
        else:
            steps = depth
            t = jnp.broadcast_to(timesteps[depth], (b,))
        x = common.partial_sample(model, sampling_params, sched, plan, x_T, prompt, null, start_guidance, steps)

        frozen_params = jax.lax.stop_gradient(base)
        contexts = [null, cond] + ([] if source is None else [source])
        outs = common.eps_many(model, frozen_params, x, t, contexts)
        target = esd_target(outs[0], outs[1], negative_guidance, None if source is None else outs[2])
        target = jax.lax.stop_gradient(target)
        pred = common.eps(model, selectors.combine(trainable, base), x, t, prompt)
        value = common.mse(pred, target)
        return value, {"t": jnp.mean(t), "steps": steps}

    return loss


# ------------------------------------------------------------------------------------------- the method


def run(job: Job) -> Result:
    """ESD: fine-tune the selected leaves towards the negatively guided prediction, on the concept's full captions
    (each names the concept: it is the erased prompt c)."""
    o, t = job.config.esd, job.config.train
    loss = make_loss(
        job.model,
        negative_guidance=o.negative_guidance,
        start_guidance=o.start_guidance,
        ddim_steps=o.ddim_steps,
        sampler=o.sampler,
        timestep_mode=o.timestep_mode,
        latent_shape=job.latent_shape,
        scheduler_config=job.pipe.scheduler_config or None,
    )
    cond = job.context(job.concept_captions)
    null = job.context([""])
    source = job.context([o.erase_from]) if o.erase_from else None
    b = int(t.batch_size)
    nulls = jnp.repeat(null, b, axis=0)
    sources = None if source is None else jnp.repeat(source, b, axis=0)

    def batch_fn(i):
        idx = finetune.pick(i, cond.shape[0], b, job.config.seed)  # ESD's word sampling: one prompt per example
        batch = {"cond": cond[idx], "uncond": nulls}
        if sources is not None:
            batch["from"] = sources
        return batch

    return Result(*finetune.train_selected(job, loss, batch_fn))
