"""Each erasure method as `run(job) -> Result`: prompts and batches from the job, the method's module, its config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from jaxdiff.erase import common
from jaxdiff.erase import evaluate as ev
from jaxdiff.erase.config import split_list
from jaxdiff.erase.job import Job, Result, probe


def _uce(job: Job) -> Result:
    from jaxdiff.erase import uce

    o = job.config.uce
    edit = job.concept_prompts
    guide = job.anchor_prompts if job.anchor.strip() else [" " if o.get("empty_guide_as_space", False) else ""]
    if o.get("expand_prompts", False):  # RECE's starting UCE block has only the edit options
        edit, guide = uce.expand_prompts(edit, guide, o.concept_type)
    preserve = job.preserve_prompts + ([""] if o.get("preserve_empty", False) else [])
    params, info = uce.uce(
        job.original,
        job.encode(edit),
        job.encode(guide),
        job.encode(preserve) if preserve else None,
        with_to_k=o.with_to_k,
        lam=o.lam,
        erase_scale=o.erase_scale,
        preserve_scale=None if o.preserve_scale < 0 else o.preserve_scale,
        edit_tokens=o.edit_tokens,
        preserve_tokens=o.preserve_tokens,
        technique=o.technique,
    )
    return Result(params, {**info, "edit_prompts": len(edit), "preserve_prompts": len(preserve)})


def _rece(job: Job) -> Result:
    from jaxdiff.erase import rece

    start = _uce(job)
    o = job.config.rece
    concepts = job.context(job.concept_prompts)
    targets = job.context([job.anchor or " "])[0]
    retain = job.context(job.preserve_prompts) if job.preserve_prompts else job.context([" "] * len(concepts))
    validate = None
    if o.validate and job.is_shapes:
        concept = ev.resolve(job.concepts[0])
        n = int(o.num_validation_prompts)
        prompts = ev.captions(concept, n, job.config.seed + 99)[0]
        latents = ev.noise(n, job.latent_shape, job.config.seed + 99)

        def validate(params, epoch):  # fraction of validation images still showing the concept (lower is better)
            return ev.attack_success(probe(), concept, job.images(prompts, latents, params))

    params, info = rece.rece(
        start.unet_params,
        job.original,
        concepts,
        targets,
        retain,
        epochs=o.epochs,
        reg=o.reg,
        lam=o.lam,
        erase_scale=o.erase_scale,
        preserve_scale=o.preserve_scale,
        technique=o.technique,
        validate=validate,
        validate_initial=o.validate_initial,
        with_to_k=job.config.uce.with_to_k,
    )
    return Result(params, {"uce": start.info, **info})


def _mace(job: Job) -> Result:
    from jaxdiff.erase import mace

    o = job.config.mace
    old = job.encode(job.concept_prompts)
    new = job.encode(job.replaced(job.concept_prompts, job.anchor))
    cache = None
    if o.cache_prompts:
        enc = job.encode(split_list(o.cache_prompts))
        from jaxdiff.erase import ridge

        cache = ridge.context_cache(enc.emb, enc.lengths)
    else:
        cache = job.preservation_cache()
    params, info = mace.cfr(
        job.original,
        old,
        new,
        cache,
        lam=o.lam,
        preserve_scale=o.preserve_scale,
        square_preserve_scale=o.square_preserve_scale,
        with_to_k=o.with_to_k,
    )
    return Result(params, info)


def _pick(step: int, n: int, batch: int, seed: int) -> np.ndarray:
    """Deterministic indices of the examples of step `step` (resumable: a pure function of the step)."""
    return np.random.default_rng([seed, 7, step]).integers(0, n, size=batch)


def _finetune(job: Job, loss, trainable, frozen, batch_fn, tx=None) -> tuple[Any, dict]:
    """Train `trainable` (the "unet" network: selected UNet leaves or adapters) on `loss` with the runner."""
    from jaxdiff.erase import finetune

    t = job.config.train
    state, info = finetune.run(
        [finetune.unet_network(t, tx)],
        finetune.single_loss(loss),
        {"unet": trainable},
        frozen,
        batch_fn,
        t,
        job.train_dir(),
        seed=job.config.seed,
        mesh=job.mesh,
        model=job.model,
        progress=job.progress,
    )
    return state.params["unet"], info


def _finetune_selected(job: Job, loss, batch_fn, base=None, frozen=None, tx=None) -> tuple[Any, dict]:
    """Fine-tune the leaves of `base` (default: the original UNet) that `config.train.selector` picks; returns the
    full edited params. `frozen` defaults to {"base": the original UNet}."""
    base = job.original if base is None else base
    trainable, _ = common.split(base, job.config.train.selector)
    frozen = {"base": job.original} if frozen is None else frozen
    trained, info = _finetune(job, loss, trainable, frozen, batch_fn, tx)
    return common.combine(trained, base), info


def _esd(job: Job) -> Result:
    from jaxdiff.erase import esd

    o, t = job.config.esd, job.config.train
    loss = esd.make_loss(
        job.model,
        negative_guidance=o.negative_guidance,
        start_guidance=o.start_guidance,
        ddim_steps=o.ddim_steps,
        sampler=o.sampler,
        timestep_mode=o.timestep_mode,
        latent_shape=job.latent_shape,
        scheduler_config=job.pipe.scheduler_config or None,
    )
    cond = job.context(job.concept_prompts)
    null = job.context([""])
    source = job.context([o.erase_from]) if o.erase_from else None
    b = int(t.batch_size)
    nulls = jnp.repeat(null, b, axis=0)
    sources = None if source is None else jnp.repeat(source, b, axis=0)

    def batch_fn(i):
        idx = _pick(i, cond.shape[0], b, job.config.seed)  # ESD's word sampling: one prompt per example
        batch = {"cond": cond[idx], "uncond": nulls}
        if sources is not None:
            batch["from"] = sources
        return batch

    return Result(*_finetune_selected(job, loss, batch_fn))


def _all_but_one(job: Job) -> Result:
    from jaxdiff.erase import all_but_one

    o, t = job.config.all_but_one, job.config.train
    loss = all_but_one.make_loss(
        job.model,
        drift_weight=o.drift_weight,
        guidance_target_scale=o.guidance_target_scale,
        start_guidance=o.start_guidance,
        ddim_steps=o.ddim_steps,
        sampler=o.sampler,
        latent_shape=job.latent_shape,
        scheduler_config=job.pipe.scheduler_config or None,
    )
    cond, alt, null = job.context(job.concept_prompts), job.context(job.anchor_prompts), job.context([""])
    b = int(t.batch_size)
    nulls = jnp.repeat(null, b, axis=0)

    def batch_fn(i):
        idx = _pick(i, cond.shape[0], b, job.config.seed)
        return {"cond": cond[idx], "alt": alt[idx], "uncond": nulls}

    return Result(*_finetune_selected(job, loss, batch_fn))


def _spm(job: Job) -> Result:
    from jaxdiff.erase import adapters as adapters_lib
    from jaxdiff.erase import spm

    o, t = job.config.spm, job.config.train
    alpha_over_rank = float(o.alpha) / int(o.rank)
    loss = spm.make_loss(
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
    target = job.context(job.concept_prompts)
    surrogate = job.context(job.anchor_prompts)
    b = int(t.batch_size)
    nulls = jnp.repeat(job.context([""]), b, axis=0)

    def batch_fn(i):
        idx = _pick(i, target.shape[0], b, job.config.seed)
        return {
            "target": target[idx],
            "positive": target[idx],
            "surrogate": surrogate[idx],
            "uncond": nulls,
        }

    adapters = spm.init_adapters(job.original, jax.random.PRNGKey(job.config.seed), rank=int(o.rank))
    trained, info = _finetune(job, loss, adapters, {"base": job.original}, batch_fn)
    targets = job.encode(job.concepts)  # Facilitated Transport compares prompts with the SPM's target concept(s)
    merge = jax.jit(lambda base, a, g: spm.apply_spms(base, [(a, g)], int(o.ft_power), alpha_over_rank))

    def params_for_prompt(prompt):
        gamma = spm.transport_gamma(job.encode([prompt]), 0, targets, o.matching_metric, o.facilitate_factor)
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


def _anchor_data(job: Job, n: int):
    """Concept Ablation / DoCo data: `n` images of the anchor prompts made by the original model, as scaled latents,
    with (target = the concept prompt, anchor = the anchor prompt) captions per image."""
    if not job.anchor.strip():
        raise ValueError(f"{job.config.method} needs an anchor concept (--config.anchor=...), e.g. square for circle")
    k = len(job.concept_prompts)
    order = [i % k for i in range(n)]
    anchors = [job.anchor_prompts[i] for i in order]
    latents = ev.noise(n, job.latent_shape, job.config.seed + 31)
    z = job.latents_of(job.images(anchors, latents))
    target = job.context(job.concept_prompts)[np.asarray(order)]
    anchor = job.context(anchors)
    return z, target, anchor


def _ablation(job: Job) -> Result:
    from jaxdiff.erase import ablation

    o, t = job.config.ablation, job.config.train
    if o.scale_lr:
        t = mlc.ConfigDict(t.to_dict())
        t.learning_rate = float(t.learning_rate) * int(t.batch_size)
        job.config.unlock()
        job.config.train = t
    loss = ablation.make_loss(
        job.model,
        loss_type=o.loss_type,
        prior_loss_weight=o.prior_loss_weight,
        scheduler_config=job.pipe.scheduler_config or None,
    )
    z, target, anchor = _anchor_data(job, int(o.num_anchor_images))
    b, n = int(t.batch_size), z.shape[0]

    def batch_fn(i):
        idx = _pick(i, n, b, job.config.seed)
        batch = {"latents": z[idx], "target": target[idx], "anchor": anchor[idx]}
        if o.with_prior:
            jdx = _pick(i, n, b, job.config.seed + 1)
            batch.update(prior_latents=z[jdx], prior=anchor[jdx])
        return batch

    params, info = _finetune_selected(job, loss, batch_fn)
    return Result(params, {**info, "learning_rate": float(t.learning_rate)})


def _doco(job: Job) -> Result:
    from jaxdiff.erase import doco, finetune
    from jaxdiff.train import optim
    from jaxdiff.train.step import Network

    o, t = job.config.doco, job.config.train
    lr = float(t.learning_rate) * (int(t.batch_size) if o.scale_lr else 1)
    d = doco.DoCo(
        job.model,
        disc_channels=tuple(o.disc_channels),
        lambda_=o.lambda_,
        gradient_clip=o.gradient_clip,
        max_grad_norm=float(t.max_grad_norm) or 1.0,
        prior_loss_weight=o.prior_loss_weight,
        warm_up=int(o.warm_up),
        disc_grad_includes_adv=o.disc_grad_includes_adv,
        add_retain_grad=o.add_retain_grad,
        scheduler_config=job.pipe.scheduler_config or None,
    )
    z, target, anchor = _anchor_data(job, int(o.num_anchor_images))
    b, n = int(t.batch_size), z.shape[0]

    def batch_fn(i):
        idx, jdx = _pick(i, n, b, job.config.seed), _pick(i, n, b, job.config.seed + 1)
        return {
            "latents": z[idx],
            "target": target[idx],
            "anchor": anchor[idx],
            "prior_latents": z[jdx],
            "prior": anchor[jdx],
        }

    trainable, _ = common.split(job.original, t.selector)
    disc = d.init_disc(jax.random.PRNGKey(job.config.seed), job.latent_shape)
    networks = [  # DoCo clips inside its gradient surgery, so neither network clips again
        Network("unet", optim.optimizer("adamw", lr, weight_decay=float(t.weight_decay))),
        Network(
            "disc", optim.optimizer("adam", float(o.disc_lr), b1=float(o.disc_betas[0]), b2=float(o.disc_betas[1]))
        ),
    ]
    state, info = finetune.run(
        networks,
        d.phases(),
        {"unet": trainable, "disc": disc},
        {"base": job.original},
        batch_fn,
        t,
        job.train_dir(),
        seed=job.config.seed,
        mesh=job.mesh,
        model=job.model,
        progress=job.progress,
    )
    return Result(common.combine(state.params["unet"], job.original), {**info, "learning_rate": lr})


def _trce(job: Job) -> Result:
    from jaxdiff.erase import trce

    o, t = job.config.trce, job.config.train
    safe_prompts = job.replaced(job.concept_prompts, job.anchor)
    old, new = job.encode(job.concept_prompts), job.encode(safe_prompts)
    stage1, info1 = trce.eot_mapping(
        job.original,
        old,
        new,
        job.preservation_cache(),
        preserve_scale=o.preserve_scale,
        square_preserve_scale=o.square_preserve_scale,
        cache_divisor=o.cache_divisor,
        lam=o.lam,
        token_weight_scale=tuple(o.token_weight_scale),
        count_tokens=o.count_tokens,
    )
    if not o.stage2:
        return Result(stage1, {"stage1": info1})

    # Stage 2 data: DDIM trajectories of the original model on the concept prompts (early steps) and on "".
    sched = common.ddim(job.pipe.scheduler_config or None)
    plan = sched.plan(int(o.ddim_steps))
    k_prompts = len(job.concept_prompts)
    seeds = int(o.seeds_per_concept)
    x_T = jnp.asarray(ev.noise(k_prompts * seeds, job.latent_shape, job.config.seed + 41))
    cond = jnp.repeat(old.emb, seeds, axis=0)
    null = job.context([""])
    _, after, _, ts = _trajectory(job, sched, plan, x_T, cond, null, float(o.data_guidance))
    early = int(o.early_steps)
    samples = [(j, k) for j in range(cond.shape[0]) for k in range(min(early, after.shape[0]))]
    n_u = int(o.uncond_trajectories)
    xu_T = jnp.asarray(ev.noise(n_u, job.latent_shape, job.config.seed + 43))
    _, after_u, _, _ = _trajectory(job, sched, plan, xu_T, jnp.repeat(null, n_u, axis=0), null, 1.0)
    safe = jnp.repeat(new.emb, seeds, axis=0)
    steps = int(t.steps) or int(o.epochs) * len(samples)
    if not int(t.steps):
        job.config.unlock()
        job.config.train.steps = steps
    per = int(o.uncond_per_step)
    nulls_u = jnp.repeat(null, per, axis=0)
    n_steps_traj = after.shape[0]

    def batch_fn(i):
        epoch, pos = divmod(i, len(samples))
        j, k = samples[int(np.random.default_rng([job.config.seed, 3, epoch]).permutation(len(samples))[pos])]
        rng = np.random.default_rng([job.config.seed, 5, i])
        ju, ku = rng.integers(0, n_u, per), rng.integers(0, n_steps_traj, per)
        return {
            "x": after[k, j][None],
            "t": ts[k][None].astype(jnp.float32),
            "safe": safe[j][None],
            "neg": cond[j][None],
            "uncond": null,
            "x_u": after_u[ku, ju],
            "t_u": ts[ku].astype(jnp.float32),
            "uncond_u": nulls_u,
        }

    loss = trce.make_stage2_loss(
        job.model, guidance=o.guidance, beta=o.beta, margin=o.margin, reg_weight=o.reg_weight, reg_const=o.reg_const
    )
    tx = trce.stage2_optimizer(float(t.learning_rate), float(t.weight_decay), o.quirk_never_zero_grads)
    params, info = _finetune_selected(job, loss, batch_fn, stage1, {"base": job.original, "reg": stage1}, tx)
    return Result(params, {"stage1": info1, **info})


def _trajectory(job: Job, sched, plan, x_T, cond, null, guidance):
    fn = jax.jit(lambda p, x, c, u: common.ddim_trajectory(job.model, p, sched, plan, x, c, u, guidance))
    return fn(job.original, x_T, cond, jnp.repeat(null, cond.shape[0], axis=0))


METHODS: dict[str, Callable[[Job], Result]] = {
    "uce": _uce,
    "rece": _rece,
    "mace": _mace,
    "trce": _trce,
    "esd": _esd,
    "spm": _spm,
    "all_but_one": _all_but_one,
    "ablation": _ablation,
    "doco": _doco,
}
