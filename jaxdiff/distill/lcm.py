"""Latent Consistency Distillation (LCM, Luo et al. 2023) on a VP teacher, after diffusers'
examples/consistency_distillation/train_lcm_distill_sd_wds.py (shared/specs/distill_anchors.md §1, the LCM row:
consistency distillation over a skipping-step DDIM teacher jump; CFG as x_c + w(x_c − x_u), w ~ U[w_min, w_max];
Huber; EMA target 0.95).

Per step (one phase on the student "unet", then the target's EMA update as a second phase on "target"):
  index ~ U{0..N−1} (N = `num_ddim_timesteps`), start = τ[index], t = max(start − k, 0), k = T // N (`ddim_solver`);
  x_s = α_s x0 + σ_s n;  student:  f_θ(x_s, s) = c_skip(s) x_s + c_out(s) x̂0_θ(x_s, s)   (`consistency_output`);
  teacher (cond-based CFG, `teacher.cfg_cond_based`): x̂0 = x̂0_c + w(x̂0_c − x̂0_u), ε̂ = ε̂_c + w(ε̂_c − ε̂_u);
  x_t = √ᾱ_prev x̂0 + √(1 − ᾱ_prev) ε̂   (`ddim_step`);  target:  f_θ⁻(x_t, t) (EMA params, no gradient);
  loss = mean(√((f_θ − f_θ⁻)² + c²) − c) (Huber, c = 0.001) or mean((f_θ − f_θ⁻)²) (`consistency_loss`).

Data: x0 are the teacher's own latents from the pair store (`jaxdiff.distill.pairs`, the prompt of each pair); the
reference trains on LAION latents.

The w-embedding (`lcm.time_cond_proj_dim` = D > 0; the script's `--unet_time_cond_proj_dim`, 256): the student is the
teacher's UNet config plus diffusers' `time_cond_proj_dim` = D, initialised from the teacher's params with the new
`time_embedding.cond_proj` kernel [D, C0] drawn as the script leaves it (it builds the student from the config and
loads the teacher's state dict with strict=False, so cond_proj keeps PyTorch's nn.Linear default init, kaiming-
uniform, U(±1/√D); `lcm.cond_proj_init` "zeros" starts the student exactly at the teacher instead). Student and EMA
target (same init) are both called with timestep_cond = guidance_embedding(w, D) of the same w the teacher's
cond-based CFG uses (the script's `guidance_scale_embedding(w, embedding_dim=...)`, w·1000 sinusoids). The saved
student keeps time_cond_proj_dim in its UNet config; jaxdiff's Pipeline then feeds it, like diffusers'
LatentConsistencyModelPipeline, guidance_embedding(guidance − 1) and runs no classifier-free guidance, so the
pipeline's `guidance` (uncond-based) s samples the cond-based w = s − 1 (`lcm.student_guidance`, default
1 + (w_min + w_max) / 2, is what the report samples with and what OUT/model/sampling_defaults.json says).

`time_cond_proj_dim` 0 / None: a student without the embedding (the teacher's architecture), w sampled for the
teacher only — the LCM-LoRA script's behaviour (train_lcm_distill_lora_sd_wds.py); sampled with guidance 1.
The student is saved with diffusers' LCMScheduler (the reference's sampler: the same N-step skipping timesteps,
boundary scalings and fresh noise).

LoRA-LCM (`lcm.lora_rank` r > 0, train_lcm_distill_lora_sd_wds.py): LoRA adapters (the script's target modules,
PEFT's init, scale lora_alpha / r) train on the frozen teacher; no w-embedding; the target is the LoRA student itself
without gradient (no EMA network); OUT/model holds the merged student (the teacher's architecture, guidance 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.distill import teacher as teacher_lib
from jaxdiff.errors import UserError

LOSSES = ("huber", "l2")


def _bc(a, x):
    a = jnp.asarray(a)
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


# ------------------------------------------------------------------------------------------------ pure functions


def scalings_for_boundary_conditions(timestep, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of the reference's `scalings_for_boundary_conditions`: with s = timestep_scaling · t,
    c_skip = σ_d² / (s² + σ_d²), c_out = s / √(s² + σ_d²) (c_skip(0) = 1, c_out(0) = 0: f(x, 0) = x)."""
    s = timestep_scaling * timestep
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def ddim_solver(alphas_cumprod, num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50):
    """The reference's `DDIMSolver`: (τ [N] int, ᾱ_prev [N], k). τ = (1..N)·(T // N) − 1 (19, 39, …, 999 for
    T = 1000, N = 50), ᾱ_prev[0] = ᾱ[0] and ᾱ_prev[i] = ᾱ[τ[i − 1]]; the skip k = T // N (the script's `topk`)."""
    acp = np.asarray(alphas_cumprod)
    k = num_train_timesteps // num_ddim_timesteps
    taus = (np.arange(1, num_ddim_timesteps + 1) * k).round().astype(np.int64) - 1
    prev = np.concatenate([acp[:1], acp[taus[:-1]]])
    return taus, prev, k


def ddim_step(pred_x0, pred_noise, alpha_cumprod_prev):
    """The reference's `DDIMSolver.ddim_step` (η = 0): √ᾱ_prev x̂0 + √(1 − ᾱ_prev) ε̂."""
    a = _bc(alpha_cumprod_prev, pred_x0)
    return jnp.sqrt(a) * pred_x0 + jnp.sqrt(1.0 - a) * pred_noise


def consistency_output(x, pred_x0, c_skip, c_out):
    """f(x, t) = c_skip(t) x + c_out(t) x̂0 (the reference's `model_pred` and `target`)."""
    return _bc(c_skip, x) * x + _bc(c_out, x) * pred_x0


def consistency_loss(pred, target, loss_type: str = "huber", huber_c: float = 0.001):
    """ "l2": mean((pred − target)²); "huber": mean(√((pred − target)² + c²) − c) (pseudo-Huber, the reference's)."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if loss_type == "l2":
        return jnp.mean(d * d)
    if loss_type == "huber":
        return jnp.mean(jnp.sqrt(d * d + huber_c**2) - huber_c)
    raise UserError(f"lcm.loss must be one of {', '.join(LOSSES)}, got {loss_type!r}")


def sample_guidance(key, batch: int, w_min: float, w_max: float):
    """w ~ U[w_min, w_max] per row (cond-based: w = 0 is the conditional teacher)."""
    return (w_max - w_min) * jax.random.uniform(key, (batch,)) + w_min


COND_PROJ_INITS = ("torch", "zeros")


# train_lcm_distill_lora_sd_wds.py's `lora_target_modules` in jaxdiff's param paths (to_out.0 -> to_out_0, ...).
LORA_TARGETS = (
    r"(to_q|to_k|to_v|to_out_0|proj_in|proj_out|ff/net_0/proj|ff/net_2|conv1|conv2|conv_shortcut"
    r"|downsamplers_0/conv|upsamplers_0/conv|time_emb_proj)/kernel$"
)


def lora_rank(settings) -> int:
    """`lcm.lora_rank` r (0: full fine-tune of the student with an EMA target)."""
    rank = int(dict(settings).get("lora_rank") or 0)
    if rank < 0:
        raise UserError(f"lcm.lora_rank must be 0 (full fine-tune) or > 0, got {rank}")
    return rank


def lora_scale(settings) -> float:
    """α / r of the LoRA adapters (PEFT's lora_alpha / r; the script's defaults α = r = 64: 1)."""
    return float(dict(settings).get("lora_alpha") or lora_rank(settings)) / lora_rank(settings)


def embedding_dim(settings) -> int:
    """The student's `time_cond_proj_dim` D (0: no w-embedding; always 0 for LoRA-LCM, which has none)."""
    dim = dict(settings).get("time_cond_proj_dim") or 0
    if int(dim) < 0:
        raise UserError(f"lcm.time_cond_proj_dim must be 0 / None (no w-embedding) or > 0, got {dim}")
    return 0 if lora_rank(settings) else int(dim)


def student_config(unet_config: dict, settings) -> dict:
    """The student's UNet config: the teacher's plus time_cond_proj_dim = D when D > 0."""
    dim = embedding_dim(settings)
    return dict(unet_config, time_cond_proj_dim=dim) if dim else dict(unet_config)


def init_student_params(teacher_params, settings, key):
    """The teacher's params plus, when D > 0, time_embedding.cond_proj.kernel [D, C0] (C0 = the time embedding's
    input width): `cond_proj_init` "torch" = nn.Linear's default (kaiming-uniform with a = √5: U(±1/√D), what the
    script leaves it as), "zeros" = the teacher's function exactly at the start."""
    s = dict(settings)
    dim = embedding_dim(s)
    if not dim:
        return teacher_params
    how = str(s.get("cond_proj_init", "torch"))
    if how not in COND_PROJ_INITS:
        raise UserError(f"lcm.cond_proj_init must be one of {', '.join(COND_PROJ_INITS)}, got {how!r}")
    time_emb = dict(teacher_params["time_embedding"])
    if "cond_proj" in time_emb:
        raise UserError("the student's initial UNet already has time_embedding.cond_proj (time_cond_proj_dim)")
    c0 = time_emb["linear_1"]["kernel"].shape[0]
    bound = 1.0 / np.sqrt(dim)
    if how == "zeros":
        kernel = jnp.zeros((dim, c0), jnp.float32)
    else:
        kernel = jax.random.uniform(key, (dim, c0), jnp.float32, -bound, bound)
    time_emb["cond_proj"] = {"kernel": kernel}
    return {**teacher_params, "time_embedding": time_emb}


def student_model(unet, settings):
    """The student's jaxdiff Model for the teacher's UNet Model `unet` (itself without a w-embedding; else a new
    Model with the student's config, built as the teacher's, params shapes only)."""
    from jaxdiff.models.model import create

    if not embedding_dim(settings):
        return unet
    m = unet.module
    cfg = student_config(unet.config, settings)
    return create(unet.architecture, cfg, abstract=True, dtype=m.dtype, attention=m.attention, platform=m.platform)


def student_unet_fn(student):
    """`student_fn(params, x, t, (context, w_embedding))` of a w-embedding student Model (what make_phases takes)."""
    return jax.jit(lambda p, x, t, c: student.apply(p, x, t, c[0], timestep_cond=c[1]))


def student_guidance(settings) -> float:
    """The pipeline guidance (uncond-based, s = w + 1) a w-embedding student samples with by default: the config's
    `student_guidance`, or (when 0 / None) the middle of the training range 1 + (w_min + w_max) / 2; 1 without the
    embedding."""
    s = dict(settings)
    if not embedding_dim(s):
        return 1.0
    if s.get("student_guidance"):
        return float(s["student_guidance"])
    return 1.0 + (float(s["w_min"]) + float(s["w_max"])) / 2.0


# ------------------------------------------------------------------------------------------------ the phases


def make_phases(unet_fn, scheduler_config: dict, settings, ema_decay: float, student_fn=None):
    """[student phase on "unet", target phase on "target"]; `frozen` holds "teacher" (UNet params) and "uncond"
    [1, L, D]; batch: "x0" [B, H, W, C] latents, "context" [B, L, D].

    With a w-embedding (settings' time_cond_proj_dim D > 0) the student and the target run
    `student_fn(params, x, t, (context, guidance_embedding(w, D) [B, D]))` (`student_unet_fn`); the teacher runs
    `unet_fn(params, x, t, context)`.

    LoRA-LCM (settings' lora_rank r > 0, train_lcm_distill_lora_sd_wds.py): "unet" holds the adapters only, the
    student is the frozen teacher with them merged (scale α / r), the target is that same student without gradient
    (the script has no separate target network) and there is no target phase.

    The target phase's `grad_fn` returns target − student (after the student's update), which the "target" network's
    optimiser `optax.sgd(1 − ema_decay)` turns into target ← decay·target + (1 − decay)·student: the reference's
    `update_ema(target_unet, unet, ema_decay)` after each optimiser step."""
    from jaxdiff.train import step as step_lib

    s = dict(settings)
    if s["loss"] not in LOSSES:
        raise UserError(f"lcm.loss must be one of {', '.join(LOSSES)}, got {s['loss']!r}")
    model = teacher_lib.Teacher(unet_fn, dict(scheduler_config))
    if model.is_flow:
        raise UserError("LCM needs a VP (ε / v / x0) teacher")
    dim = embedding_dim(s)
    if dim and student_fn is None:
        raise UserError(
            f"lcm.time_cond_proj_dim={dim}: the student takes a w-embedding; pass its UNet function (student_fn, "
            "lcm.student_unet_fn) or set lcm.time_cond_proj_dim=0"
        )
    student = teacher_lib.Teacher(student_fn, dict(scheduler_config), name="student") if dim else model
    rank = lora_rank(s)
    scale = lora_scale(s) if rank else 1.0
    taus, prev, k = ddim_solver(
        model.alphas_cumprod(), int(scheduler_config.get("num_train_timesteps", 1000)), int(s["num_ddim_timesteps"])
    )
    taus_j, prev_j = jnp.asarray(taus, jnp.float32), jnp.asarray(prev, jnp.float32)
    sd, ts = float(s["sigma_data"]), float(s["timestep_scaling"])
    w_min, w_max = float(s["w_min"]), float(s["w_max"])

    def student_loss(params, frozen, batch, rng):
        k_i, k_n, k_w = jax.random.split(rng, 3)
        x0, ctx = batch["x0"].astype(jnp.float32), batch["context"]
        b = x0.shape[0]
        index = jax.random.randint(k_i, (b,), 0, len(taus))
        start = taus_j[index]
        t = jnp.maximum(start - k, 0.0)
        c_skip_s, c_out_s = scalings_for_boundary_conditions(start, sd, ts)
        c_skip_t, c_out_t = scalings_for_boundary_conditions(t, sd, ts)
        noise = jax.random.normal(k_n, x0.shape)
        alpha, sigma = model.alpha_sigma(start)
        x_s = _bc(alpha, x0) * x0 + _bc(sigma, x0) * noise
        w = sample_guidance(k_w, b, w_min, w_max)
        s_ctx = (ctx, teacher_lib.guidance_embedding(w, dim)) if dim else ctx  # the script embeds w itself
        if rank:  # LoRA-LCM: the teacher plus the adapters; the target is the same student, no gradient
            from jaxdiff import lora

            student_params = lora.merge(frozen["teacher"], params["unet"], 1.0, scale)
            target_params = jax.lax.stop_gradient(student_params)
        else:
            student_params, target_params = params["unet"], jax.lax.stop_gradient(params["target"])
        pred_x0, _ = student.x0_eps(student_params, x_s, start, s_ctx)
        pred = consistency_output(x_s, pred_x0, c_skip_s, c_out_s)
        uncond = jnp.broadcast_to(frozen["uncond"], ctx.shape)
        x2, t2 = jnp.concatenate([x_s, x_s]), jnp.concatenate([start, start])
        tx0, teps = model.x0_eps(frozen["teacher"], x2, t2, jnp.concatenate([ctx, uncond]))
        (cx0, ux0), (ce, ue) = jnp.split(tx0, 2), jnp.split(teps, 2)
        g_x0 = teacher_lib.cfg_cond_based(cx0, ux0, _bc(w, x0))
        g_eps = teacher_lib.cfg_cond_based(ce, ue, _bc(w, x0))
        x_t = jax.lax.stop_gradient(ddim_step(g_x0, g_eps, prev_j[index]))
        t_x0, _ = student.x0_eps(target_params, x_t, t, s_ctx)
        target = jax.lax.stop_gradient(consistency_output(x_t, t_x0, c_skip_t, c_out_t))
        loss = consistency_loss(pred, target, str(s["loss"]), float(s["huber_c"]))
        return loss, {"t_mean": jnp.mean(start), "w_mean": jnp.mean(w)}

    def target_grad(params, frozen, batch, rng):
        diff = jax.tree_util.tree_map(lambda a, b: a - b, params["target"], jax.lax.stop_gradient(params["unet"]))
        return diff, jnp.float32(0.0), {}

    if rank:
        return [step_lib.Phase("student", "unet", student_loss)]
    if not 0.0 <= ema_decay < 1.0:
        raise UserError(f"lcm.ema_decay must be in [0, 1), got {ema_decay}")
    return [
        step_lib.Phase("student", "unet", student_loss),
        step_lib.Phase("target", "target", grad_fn=target_grad),
    ]


# ------------------------------------------------------------------------------------------------ training


def build(config, unet_fn, features_fn=None, scheduler_config=None, latent_shape=None, student_fn=None):
    """(networks, phases) of an LCM step: the student ("unet", the train block's optimiser, schedule and clipping)
    and its EMA target ("target", `optax.sgd(1 − lcm.ema_decay)`), the phases of `make_phases` with the config's
    `lcm` block. `unet_fn(params, x, t, context)`; `features_fn` and `latent_shape` are unused (other methods');
    `student_fn`: the student's UNet function when lcm.time_cond_proj_dim > 0 (`student_unet_fn`). LoRA-LCM
    (lcm.lora_rank > 0): "unet" trains the adapters and there is no "target" network."""
    import optax

    from jaxdiff.erase import finetune
    from jaxdiff.train import step as step_lib

    t, s = config.train, config.lcm
    decay = float(s.ema_decay)
    phases = make_phases(unet_fn, scheduler_config, s, decay, student_fn)
    lr = finetune.schedule(t)
    networks = [step_lib.Network("unet", finetune.optimizer(t, lr), lr, clip_norm=float(t.max_grad_norm))]
    if not lora_rank(s):
        networks.append(step_lib.Network("target", optax.sgd(1.0 - decay)))
    return networks, phases


def initial_params(config, student, teacher, features_fn=None, latent_shape=None, context=None) -> dict:
    """{"unet": a copy of the student, "target": another copy}; with a w-embedding, the student plus the cond_proj
    kernel (`init_student_params`, drawn from config.seed), the same in both (the script's target is a copy of the
    student). LoRA-LCM: {"unet": adapters on the teacher's LORA_TARGETS kernels} (PEFT's init: down kaiming-uniform
    U(±1/√fan_in), up zeros, so the student starts as the teacher)."""
    key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 13)
    if lora_rank(config.lcm):
        from jaxdiff import lora

        return {"unet": lora.init_by_selector(teacher, LORA_TARGETS, rank=lora_rank(config.lcm), key=key)}
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # noqa: E731  (no buffer shared with the teacher)
    student = init_student_params(student, config.lcm, key)
    return {"unet": copy(student), "target": copy(student)}


def train(config, pipe, init_params, pairs: dict, contexts, uncond, workdir: str, progress: bool):
    """Student ("unet") and its EMA target ("target"), both from `init_params` (the teacher by default; with a
    w-embedding, plus the cond_proj kernel); returns (the student's params, info). LoRA-LCM: the adapters train on
    the frozen teacher and the student returned is the teacher with them merged."""
    from jaxdiff.distill import run as run_lib

    t = config.train
    unet = pipe.unet
    if lora_rank(config.lcm) and str(config.init) != "teacher":
        raise UserError("LoRA-LCM (lcm.lora_rank > 0) trains adapters on the teacher itself: leave config.init=teacher")
    unet_fn = jax.jit(lambda p, x, tt, ctx: unet.apply(p, x, tt, ctx))
    student_fn = student_unet_fn(student_model(unet, config.lcm)) if embedding_dim(config.lcm) else None
    networks, phases = build(config, unet_fn, None, pipe.scheduler_config, student_fn=student_fn)
    params = initial_params(config, init_params, pipe.unet.params)
    batch_fn = run_lib.pair_batches(pairs, contexts, int(t.batch_size), int(config.seed))
    state, info = run_lib.train_beside_teacher(
        networks, phases, params, pipe, uncond, batch_fn, config, workdir, progress, "LCM step"
    )
    if lora_rank(config.lcm):
        from jaxdiff import lora

        merged = lora.merge(pipe.unet.params, state.params["unet"], 1.0, lora_scale(config.lcm))
        info = {**info, "lora_parameters": lora.num_params(state.params["unet"])}
        return jax.tree_util.tree_map(np.asarray, merged), info
    return state.params["unet"], info


# ------------------------------------------------------------------------------------------------ the student


def student_scheduler(scheduler_config: dict, settings=None) -> dict:
    """diffusers' LCMScheduler for the student (the reference's inference): original_inference_steps = N (the
    solver's skipping timesteps), the training's timestep scaling, x̂0 re-noised with fresh noise between steps."""
    s = dict(settings or {})
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    sched = {k: scheduler_config[k] for k in keep if k in scheduler_config}
    sched.update(
        _class_name="LCMScheduler",
        _diffusers_version="0.42.0",
        original_inference_steps=int(s.get("num_ddim_timesteps", 50)),
        timestep_scaling=float(s.get("timestep_scaling", 10.0)),
        set_alpha_to_one=True,
        steps_offset=0,
        clip_sample=False,
    )
    return sched


def distill(config, pipe, init_params, pairs, contexts, uncond, out, progress: bool = True) -> dict:
    """`jaxdiff distill` for method "lcm" (run.distill hands over after the pairs): train, OUT/model (an LCMScheduler
    student, `sampling_defaults` steps = eval.student_steps[0], no CFG; with a w-embedding its UNet config keeps
    time_cond_proj_dim and the defaults' guidance is `student_guidance`), the grid and the NFE-vs-quality report."""
    import dataclasses
    import json
    from pathlib import Path

    from jaxdiff import fileio
    from jaxdiff.distill import run as run_lib
    from jaxdiff.sampling.pipeline import load_pipeline

    out = Path(out)
    params, info, seconds = run_lib.timed(
        train, config, pipe, init_params, pairs, contexts, uncond, str(out / "train"), progress
    )
    sched = student_scheduler(pipe.scheduler_config, config.lcm)
    student_pipe = dataclasses.replace(pipe, unet=student_model(pipe.unet, config.lcm), _compiled={})
    run_lib.save_student(student_pipe, params, out, int(config.eval.student_steps[0]), sched)
    guidance = student_guidance(config.lcm)
    if guidance != 1.0:  # a w-embedding student samples with its guidance (no CFG: one UNet call per step)
        path = out / "model" / "sampling_defaults.json"
        fileio.atomic_write_text(path, json.dumps({**json.loads(path.read_text()), "guidance": guidance}) + "\n")
    student = load_pipeline(out / "model")
    plain = lambda v: v if isinstance(v, str) or v is None else float(v)  # noqa: E731
    settings = {"lcm": {k: plain(v) for k, v in dict(config.lcm).items()}}
    settings["lcm"]["student_guidance"] = guidance

    def sample_student(pipe_, params_, prompts, latents, steps):
        return np.asarray(student(list(prompts), steps=int(steps), guidance=guidance, latents=latents))

    return run_lib.write_report(config, pipe, params, out, info, seconds, settings, sample_student, "LCM")
