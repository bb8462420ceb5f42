"""`jaxdiff erase`: one erasure method from its config on a pipeline; writes the edited model, a grid and a report.

    erase(config, out) -> report dict

Output folder:
  model/            the edited pipeline (jaxdiff checkpoint; `jaxdiff export out/model DST` gives a diffusers folder)
  adapter/          SPM only: the adapters (safetensors) and the Facilitated Transport settings
  before_after.png  rows of unedited / edited samples (same seeds) for the target word, its synonyms, held-out
                    templates and preserved concepts
  report.json, report.md   erasure / preservation figures from the shapes probe (built-in `shapes` model), the
                    edit's wall-clock time and peak memory, optionally attack success rates
  train/            fine-tuning methods: orbax checkpoints (a killed run resumes), metrics.jsonl, TensorBoard
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from jaxdiff.erase import common
from jaxdiff.erase import evaluate as ev
from jaxdiff.erase.config import split_list


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


@dataclasses.dataclass
class Result:
    """What a method returns: the edited UNet params, or adapters with a per-prompt params function (SPM)."""

    unet_params: Any
    info: dict
    params_for_prompt: Callable[[str], Any] | None = None  # prompt -> UNet params (Facilitated Transport)
    adapters: Any = None
    adapter_meta: dict | None = None


class Job:
    """One erasure run: the pipeline, the prompt sets every method draws from, and cached encodings."""

    def __init__(self, config: mlc.ConfigDict, out: Path, progress: bool = True):
        from jaxdiff.sampling.pipeline import BUILTIN, load_pipeline

        self.config, self.out, self.progress = config, out, progress
        self.concepts = split_list(config.concept)
        if not self.concepts:
            raise ValueError("config.concept is empty: name the concept to erase, e.g. --config.concept=circle")
        self.preserve = split_list(config.preserve)
        self.anchor = config.anchor
        self.is_shapes = str(config.model) == "shapes" or Path(str(config.model)).resolve() == BUILTIN["shapes"]
        self.pipe = load_pipeline(config.model)
        if self.pipe.is_sdxl:
            raise ValueError("jaxdiff erase supports SD 1.x/2.x pipelines (one text encoder); this one is SDXL")
        self.model = self.pipe.unet
        self.original = self.pipe.unet.params
        c = self.model.config
        self.latent_shape = (int(c.get("sample_size", 64)),) * 2 + (int(c.get("in_channels", 4)),)
        self._enc: dict[tuple[str, ...], common.Encoded] = {}

    # -- prompts -------------------------------------------------------------------------------------------------
    def prompts_for(self, concepts: list[str]) -> list[str]:
        """templates × concepts, plus (shapes model, `num_prompts` > 0) captions of the world naming each, cut
        after the concept ("a picture of a red circle on the left" -> "a picture of a red circle"): the text
        encoder is causal, so the concept's token and the [EoT] after it carry the concept, as the closed-form
        methods' last-word / [EoT] token choices assume."""
        out = [t.format(x) for x in concepts for t in self.config.templates]
        n = int(self.config.num_prompts)
        if n and self.is_shapes:
            for i, x in enumerate(concepts):
                for caption in ev.captions(ev.resolve(x), n, self.config.seed + 17 * i)[0]:
                    m = re.search(r"(?<![\w-])" + re.escape(x) + r"(?![\w-])", caption)
                    out.append(caption[: m.end()] if m else caption)
        return out

    @functools.cached_property
    def concept_prompts(self) -> list[str]:
        return self.prompts_for(self.concepts)

    @functools.cached_property
    def preserve_prompts(self) -> list[str]:
        return self.prompts_for(self.preserve)

    def replaced(self, prompts: list[str], by: str) -> list[str]:
        """Each prompt with the erased concept's word replaced by `by` (removed when empty)."""
        pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(c) for c in self.concepts) + r")(?![\w-])")
        return [" ".join(pattern.sub(by, p).split()) for p in prompts]

    @functools.cached_property
    def anchor_prompts(self) -> list[str]:
        """The concept prompts with the concept replaced by the anchor ("" when the anchor is empty)."""
        if not self.anchor.strip():
            return [""] * len(self.concept_prompts)
        return self.replaced(self.concept_prompts, self.anchor)

    def encode(self, prompts: list[str]) -> common.Encoded:
        key = tuple(prompts)
        if key not in self._enc:
            self._enc[key] = common.encode(self.pipe, list(prompts))
        return self._enc[key]

    def context(self, prompts: list[str]) -> jax.Array:
        return self.encode(prompts).emb

    def preservation_cache(self):
        """Σ c cᵀ over the preserved prompts' tokens (MACE/TRCE); world captions without the concept when none."""
        from jaxdiff.erase import ridge

        prompts = self.preserve_prompts
        if not prompts and self.is_shapes:
            c = ev.resolve(self.concepts[0])
            prompts = ev.captions(None, 32, self.config.seed + 5, exclude=c.name, kind=c.kind)[0]
        if not prompts:
            return None
        enc = self.encode(prompts)
        return ridge.context_cache(enc.emb, enc.lengths)

    # -- images --------------------------------------------------------------------------------------------------
    def images(
        self,
        prompts: list[str],
        latents: np.ndarray,
        unet_params=None,
        params_for_prompt=None,
        guidance: float | None = None,
    ) -> np.ndarray:
        """Samples for `prompts` from the given starting noise; per-prompt params (SPM) run one prompt at a time."""
        e = self.config.eval
        guidance = self.guidance if guidance is None else guidance
        kw = dict(steps=int(e.steps), guidance=guidance, scheduler=e.scheduler or None)
        if params_for_prompt is None:
            params = {**self.pipe.params, "unet": self.original if unet_params is None else unet_params}
            return self.pipe(prompts, latents=latents, params=params, **kw)
        out = []
        for i, p in enumerate(prompts):
            params = {**self.pipe.params, "unet": params_for_prompt(p)}
            out.append(self.pipe([p], latents=latents[i : i + 1], params=params, **kw))
        return np.concatenate(out)

    @functools.cached_property
    def guidance(self) -> float:
        g = float(self.config.eval.guidance)
        if g >= 0:
            return g
        defaults = self.pipe.path / "sampling_defaults.json"
        return float(json.loads(defaults.read_text()).get("guidance", 7.5)) if defaults.is_file() else 7.5

    def train_dir(self) -> str:
        return str(self.out / "train")

    @functools.cached_property
    def mesh(self):
        """The fine-tuning mesh of `config.mesh` (all devices when an axis is -1, else the first ones)."""
        from jaxdiff import sharding
        from jaxdiff.train.config import mesh_shape

        shape = {k: int(v) for k, v in self.config.mesh.to_dict().items()}
        devices = jax.devices()
        if -1 not in shape.values():
            devices = devices[: int(np.prod(list(shape.values())))]
        return sharding.make_mesh(mesh_shape(shape, len(devices)), devices)


# ------------------------------------------------------------------------------------------------ methods


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
        probe = _probe()

        def validate(params, epoch):  # fraction of validation images still showing the concept (lower is better)
            return ev.attack_success(probe, concept, job.images(prompts, latents, params))

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
    from jaxdiff.erase import finetune

    t = job.config.train
    trainer = finetune.trainer_step(
        loss, trainable, t, job.config.seed, tx, mesh=job.mesh, model=job.model, frozen=frozen
    )
    state, info = finetune.run(
        trainer.step,
        trainer.state,
        frozen,
        batch_fn,
        int(t.steps),
        job.train_dir(),
        checkpoint_every=int(t.checkpoint_every),
        log_every=int(t.log_every),
        progress=job.progress,
        leaf_names=trainer.leaf_names,
        batch_sharding=trainer.batch_sharding,
        frozen_sharding=trainer.frozen_sharding,
    )
    return state.params, info


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

    def batch_fn(i):
        idx = _pick(i, cond.shape[0], b, job.config.seed)  # ESD's word sampling: one prompt per example
        batch = {"cond": cond[idx], "uncond": jnp.repeat(null, b, axis=0)}
        if source is not None:
            batch["from"] = jnp.repeat(source, b, axis=0)
        return batch

    trainable, _ = common.split(job.original, t.selector)
    trained, info = _finetune(job, loss, trainable, {"base": job.original}, batch_fn)
    return Result(common.combine(trained, job.original), info)


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

    def batch_fn(i):
        idx = _pick(i, cond.shape[0], b, job.config.seed)
        return {"cond": cond[idx], "alt": alt[idx], "uncond": jnp.repeat(null, b, axis=0)}

    trainable, _ = common.split(job.original, t.selector)
    trained, info = _finetune(job, loss, trainable, {"base": job.original}, batch_fn)
    return Result(common.combine(trained, job.original), info)


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
    null = job.context([""])
    b = int(t.batch_size)

    def batch_fn(i):
        idx = _pick(i, target.shape[0], b, job.config.seed)
        return {
            "target": target[idx],
            "positive": target[idx],
            "surrogate": surrogate[idx],
            "uncond": jnp.repeat(null, b, axis=0),
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
    images = job.images(anchors, latents)
    vae = job.pipe.vae
    encode = jax.jit(lambda p, x: vae.encode(p, x * 2.0 - 1.0)[0] * vae.config.get("scaling_factor", 0.18215))
    z = encode(vae.params, jnp.asarray(images, jnp.float32))
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

    trainable, _ = common.split(job.original, t.selector)
    trained, info = _finetune(job, loss, trainable, {"base": job.original}, batch_fn)
    return Result(common.combine(trained, job.original), {**info, "learning_rate": float(t.learning_rate)})


def _doco(job: Job) -> Result:
    import optax

    from jaxdiff.erase import doco, finetune

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
    unet_opt = optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=float(t.weight_decay))
    disc_opt = optax.adam(float(o.disc_lr), b1=float(o.disc_betas[0]), b2=float(o.disc_betas[1]))
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
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)  # the state is donated; the frozen base is not
    key = jax.random.PRNGKey(job.config.seed)
    state = d.init_state(trainable, unet_opt, disc_opt, key, job.latent_shape)
    inner = d.make_step(unet_opt, disc_opt)
    step = jax.jit(
        lambda s, batch, frozen: inner(s, frozen, batch, jax.random.fold_in(key, s.step)), donate_argnums=(0,)
    )
    state, info = finetune.run(
        step,
        state,
        {"base": job.original},
        batch_fn,
        int(t.steps),
        job.train_dir(),
        checkpoint_every=int(t.checkpoint_every),
        log_every=int(t.log_every),
        progress=job.progress,
    )
    return Result(common.combine(state.trainable, job.original), {**info, "learning_rate": lr})


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
            "uncond_u": jnp.repeat(null, per, axis=0),
        }

    loss = trce.make_stage2_loss(
        job.model, guidance=o.guidance, beta=o.beta, margin=o.margin, reg_weight=o.reg_weight, reg_const=o.reg_const
    )
    tx = trce.stage2_optimizer(float(t.learning_rate), float(t.weight_decay), o.quirk_never_zero_grads)
    trainable, _ = common.split(stage1, t.selector)
    trained, info = _finetune(job, loss, trainable, {"base": job.original, "reg": stage1}, batch_fn, tx)
    return Result(common.combine(trained, stage1), {"stage1": info1, **info})


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


@functools.lru_cache(maxsize=1)
def _probe():
    from jaxdiff.metrics.probe import load_probe

    return load_probe()


# ---------------------------------------------------------------------------------------------- the command

GRID_SAMPLES = 6


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prepare_out(out: Path, config: mlc.ConfigDict, overwrite: bool) -> None:
    """An empty or new folder, or the folder of an interrupted run of the same config (which then resumes)."""
    saved = out / "config.json"
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not saved.is_file():
            raise FileExistsError(f"{out} exists and is not an erase output folder (use --overwrite to replace it)")
        elif json.loads(saved.read_text()) != json.loads(config.to_json_best_effort()):
            raise FileExistsError(
                f"{out} holds a run with a different config (see its config.json); use --overwrite or another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    _write_text(saved, config.to_json_best_effort(indent=2) + "\n")


def _save_outputs(job: Job, result: Result) -> None:
    from jaxdiff.convert import checkpoint
    from jaxdiff.convert.safetensors_io import write_safetensors

    models = {
        "unet": dataclasses.replace(job.pipe.unet, params=result.unet_params),
        "vae": job.pipe.vae,
        "text_encoder": job.pipe.text_encoders[0],
    }
    checkpoint.save_pipeline(job.pipe.path, job.out / "model", models, overwrite=True)
    if result.adapters is not None:
        with checkpoint.atomic_directory(job.out / "adapter", overwrite=True) as tmp:
            flat = {
                f"{name}/{k}": np.asarray(v, np.float32) for name, a in result.adapters.items() for k, v in a.items()
            }
            write_safetensors(tmp / "adapters.safetensors", flat, metadata={"format": "jaxdiff-spm"})
            (tmp / "spm.json").write_text(json.dumps(result.adapter_meta, indent=2) + "\n")


def _sets(job: Job, concept: ev.Concept | None) -> dict[str, tuple[list[str], list]]:
    n = int(job.config.eval.num_images)
    if concept is not None:
        return ev.prompt_sets(concept, n, int(job.config.eval.seed))
    # No probe for this model: the grid shows the config's prompts.
    syn = [t.format(s) for s in split_list(job.config.synonyms) for t in job.config.templates]
    return {
        "word": (job.concept_prompts[:n], []),
        "synonyms": (syn[:n], []),
        "preserved": (job.preserve_prompts[:n], []),
    }


def _attacks(job: Job, result: Result, concept: ev.Concept, probe) -> dict:
    """Attack success rates of RECE's regenerating embedding and the soft-prompt attack (fixed budgets)."""
    from jaxdiff.erase import attacks

    e = job.config.eval
    n = int(e.attack_images)
    prompts = ev.captions(concept, n, int(e.seed) + 7)[0]
    latents = ev.noise(n, job.latent_shape, int(e.seed) + 7)
    edited = result.unet_params
    out = {}
    t0 = time.perf_counter()
    adv = attacks.regenerating_embedding_attack(edited, job.original, job.context(prompts), reg=float(e.attack_reg))
    images = _images_from_context(job, adv, latents, edited)
    out["regenerating_embedding"] = {
        "success": ev.attack_success(probe, concept, images),
        "n": n,
        "seconds": time.perf_counter() - t0,
        "reg": float(e.attack_reg),
    }
    t0 = time.perf_counter()
    target_latents = _concept_latents(job, prompts, latents)
    contexts, info = attacks.soft_prompt_attack(
        job.pipe,
        edited,
        prompts,
        target_latents,
        num_tokens=int(e.attack_tokens),
        steps=int(e.attack_steps),
        learning_rate=float(e.attack_lr),
        seed=int(e.seed),
    )
    images = _images_from_context(job, contexts, latents, edited)
    out["soft_prompt"] = {
        "success": ev.attack_success(probe, concept, images),
        "n": n,
        "seconds": time.perf_counter() - t0,
        "steps": int(e.attack_steps),
        "tokens": int(e.attack_tokens),
        "loss_first": float(info["loss_first"]),
        "loss_last": float(info["loss_last"]),
    }
    out["_images"] = images
    return out


def _images_from_context(job: Job, contexts, latents, unet_params) -> np.ndarray:
    e = job.config.eval
    params = {**job.pipe.params, "unet": unet_params}
    return job.pipe(
        None,
        prompt_embeds=contexts,
        latents=latents,
        params=params,
        steps=int(e.steps),
        guidance=job.guidance,
        scheduler=e.scheduler or None,
    )


def _concept_latents(job: Job, prompts, latents):
    """Scaled latents of the original model's images of the concept (the attack's targets)."""
    images = job.images(prompts, latents)
    vae = job.pipe.vae
    encode = jax.jit(lambda p, x: vae.encode(p, x * 2.0 - 1.0)[0] * vae.config.get("scaling_factor", 0.18215))
    return encode(vae.params, jnp.asarray(images, jnp.float32))


def erase(config: mlc.ConfigDict, out: str | os.PathLike, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Run the configured method; write model/, before_after.png, report.json and report.md to `out`."""
    from jaxdiff.images import labeled_rows, save_png

    if config.method not in METHODS:
        raise ValueError(f"unknown erasure method {config.method!r}; choose from {', '.join(METHODS)}")
    out = Path(out)
    _prepare_out(out, config, overwrite)
    job = Job(config, out, progress)
    concept = None
    if job.is_shapes:
        concept = ev.resolve(job.concepts[0])
    t0 = time.perf_counter()
    result = METHODS[config.method](job)
    jax.block_until_ready(result.unet_params)
    seconds = time.perf_counter() - t0
    peak = peak_rss_gb()
    _save_outputs(job, result)

    report = {
        "method": config.method,
        "concept": config.concept,
        "preserve": config.preserve,
        "anchor": config.anchor,
        "model": str(config.model),
        "cost": {"seconds": seconds, "peak_rss_gb": peak},
        "info": _jsonable(result.info),
    }
    sets = _sets(job, concept)
    before, after, rows = {}, {}, []
    e = config.eval
    for i, (name, (prompts, _)) in enumerate(sets.items()):
        if not prompts:
            continue
        latents = ev.noise(len(prompts), job.latent_shape, int(e.seed) + i)
        before[name] = job.images(prompts, latents)
        after[name] = job.images(prompts, latents, result.unet_params, result.params_for_prompt)
        k = min(GRID_SAMPLES, len(prompts))
        rows += [(f"{name}\nbefore", before[name][:k]), (f"{name}\nafter ({config.method})", after[name][:k])]
    if concept is not None:
        probe = _probe()
        prompts = sets["preserved"][0]
        floor = job.images(prompts, ev.noise(len(prompts), job.latent_shape, int(e.seed) + 1000))
        report.update(ev.evaluate(probe, concept, before, after, sets, floor))
        # What a perfect erasure towards "nothing" gives: the unedited model on the word prompts without the word
        # (its prior fills the gap: in shapes, "a red" draws round blobs the probe calls circles).
        prompts = job.replaced(sets["word"][0], "") if job.concepts == [concept.word] else None
        if prompts is not None:
            without = job.images(prompts, ev.noise(len(prompts), job.latent_shape, int(e.seed)))
            report["erasure"]["word"]["without_word"] = ev.attack_success(probe, concept, without)
        if e.attacks:
            attack = _attacks(job, result, concept, probe)
            rows.append(("soft-prompt\nattack", attack.pop("_images")[:GRID_SAMPLES]))
            report["robustness"] = attack
    report["prompts"] = {name: prompts[:4] for name, (prompts, _) in sets.items()}
    save_png(out / "before_after.png", labeled_rows(rows))
    _write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    _write_text(out / "report.md", markdown(report))
    return report


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, jax.Array)) or hasattr(x, "item"):
        return np.asarray(x).item() if np.asarray(x).size == 1 else np.asarray(x).tolist()
    return x


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(report: dict) -> str:
    """report.md: the figures of report.json as tables."""
    lines = [
        f"# {report['method']}: erase `{report['concept']}` from `{report['model']}`",
        "",
        f"Edit: {report['cost']['seconds']:.1f} s wall-clock, peak memory {report['cost']['peak_rss_gb']:.2f} GiB "
        "(process RSS).",
        "",
    ]
    if "erasure" in report:
        lines += [
            "## Erasure (probe sees the concept; lower is better after the edit)",
            "",
            "| prompts | before | after | n |",
            "|---|---:|---:|---:|",
        ]
        for name, r in report["erasure"].items():
            lines.append(
                f"| {name} | n/a | n/a | 0 |"
                if r is None
                else f"| {name} | {_pct(r['before'])} | {_pct(r['after'])} | {r['n']} |"
            )
        without = (report["erasure"].get("word") or {}).get("without_word")
        if without is not None:
            lines += [
                "",
                f"The unedited model on the word prompts with the word removed sees the concept in {_pct(without)} "
                "(same seeds): what a perfect erasure towards nothing would give.",
            ]
        p = report["preservation"]
        lines += [
            "",
            "## Preservation (prompts of the other concepts)",
            "",
            "| measure | before | after |",
            "|---|---:|---:|",
        ]
        for key in ("shape_acc", "colour_acc"):
            lines.append(f"| {key} | {_pct(p[key]['before'])} | {_pct(p[key]['after'])} |")
        lines.append(f"| Fréchet (probe features) vs unedited, same seeds | 0 | {p['frechet']:.2f} |")
        if "frechet_floor" in p:
            lines.append(f"| Fréchet between two seed sets of the unedited model | {p['frechet_floor']:.2f} | |")
    if "robustness" in report:
        lines += [
            "",
            "## Robustness (attack success: probe sees the concept)",
            "",
            "| attack | success | budget |",
            "|---|---:|---|",
        ]
        r = report["robustness"]
        lines.append(f"| RECE regenerating embedding | {_pct(r['regenerating_embedding']['success'])} | closed form |")
        s = r["soft_prompt"]
        lines.append(f"| soft prompt ({s['tokens']} tokens) | {_pct(s['success'])} | {s['steps']} Adam steps |")
    lines += ["", "Samples: before_after.png. Prompts (first of each set):", ""]
    lines += [f"- {name}: " + "; ".join(f"`{p}`" for p in prompts) for name, prompts in report["prompts"].items()]
    return "\n".join(lines) + "\n"
