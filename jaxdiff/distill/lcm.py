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

Not as in the reference: the student takes no guidance-scale embedding (jaxdiff's UNet has no `time_cond_proj_dim`
path), so w is sampled for the teacher only — the LCM-LoRA script's behaviour (train_lcm_distill_lora_sd_wds.py);
`teacher.guidance_embedding` is there for when the UNet takes one. The student is saved with diffusers'
LCMScheduler (the reference's sampler: the same N-step skipping timesteps, boundary scalings and fresh noise).
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


# ------------------------------------------------------------------------------------------------ the phases


def make_phases(unet_fn, scheduler_config: dict, settings, ema_decay: float):
    """[student phase on "unet", target phase on "target"]; `frozen` holds "teacher" (UNet params) and "uncond"
    [1, L, D]; batch: "x0" [B, H, W, C] latents, "context" [B, L, D].

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
        pred_x0, _ = model.x0_eps(params["unet"], x_s, start, ctx)
        pred = consistency_output(x_s, pred_x0, c_skip_s, c_out_s)
        uncond = jnp.broadcast_to(frozen["uncond"], ctx.shape)
        x2, t2 = jnp.concatenate([x_s, x_s]), jnp.concatenate([start, start])
        tx0, teps = model.x0_eps(frozen["teacher"], x2, t2, jnp.concatenate([ctx, uncond]))
        (cx0, ux0), (ce, ue) = jnp.split(tx0, 2), jnp.split(teps, 2)
        g_x0 = teacher_lib.cfg_cond_based(cx0, ux0, _bc(w, x0))
        g_eps = teacher_lib.cfg_cond_based(ce, ue, _bc(w, x0))
        x_t = jax.lax.stop_gradient(ddim_step(g_x0, g_eps, prev_j[index]))
        target_params = jax.lax.stop_gradient(params["target"])
        t_x0, _ = model.x0_eps(target_params, x_t, t, ctx)
        target = jax.lax.stop_gradient(consistency_output(x_t, t_x0, c_skip_t, c_out_t))
        loss = consistency_loss(pred, target, str(s["loss"]), float(s["huber_c"]))
        return loss, {"t_mean": jnp.mean(start), "w_mean": jnp.mean(w)}

    def target_grad(params, frozen, batch, rng):
        diff = jax.tree_util.tree_map(lambda a, b: a - b, params["target"], jax.lax.stop_gradient(params["unet"]))
        return diff, jnp.float32(0.0), {}

    if not 0.0 <= ema_decay < 1.0:
        raise UserError(f"lcm.ema_decay must be in [0, 1), got {ema_decay}")
    return [
        step_lib.Phase("student", "unet", student_loss),
        step_lib.Phase("target", "target", grad_fn=target_grad),
    ]


# ------------------------------------------------------------------------------------------------ training


def build(config, unet_fn, features_fn=None, scheduler_config=None, latent_shape=None):
    """(networks, phases) of an LCM step: the student ("unet", the train block's optimiser, schedule and clipping)
    and its EMA target ("target", `optax.sgd(1 − lcm.ema_decay)`), the phases of `make_phases` with the config's
    `lcm` block. `unet_fn(params, x, t, context)`; `features_fn` and `latent_shape` are unused (other methods')."""
    import optax

    from jaxdiff.erase import finetune
    from jaxdiff.train import step as step_lib

    t, s = config.train, config.lcm
    decay = float(s.ema_decay)
    phases = make_phases(unet_fn, scheduler_config, s, decay)
    lr = finetune.schedule(t)
    networks = [
        step_lib.Network("unet", finetune.optimizer(t, lr), lr, clip_norm=float(t.max_grad_norm)),
        step_lib.Network("target", optax.sgd(1.0 - decay)),
    ]
    return networks, phases


def initial_params(config, student, teacher, features_fn=None, latent_shape=None, context=None) -> dict:
    """{"unet": a copy of the student, "target": another copy}."""
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # noqa: E731  (no buffer shared with the teacher)
    return {"unet": copy(student), "target": copy(student)}


def train(config, pipe, init_params, pairs: dict, contexts, uncond, workdir: str, progress: bool):
    """Student ("unet") and its EMA target ("target"), both from `init_params` (the teacher by default); returns
    (the student's params, info)."""
    from jaxdiff.distill import run as run_lib

    t = config.train
    unet = pipe.unet
    unet_fn = jax.jit(lambda p, x, tt, ctx: unet.apply(p, x, tt, ctx))
    networks, phases = build(config, unet_fn, None, pipe.scheduler_config)
    params = initial_params(config, init_params, pipe.unet.params)
    batch_fn = run_lib.pair_batches(pairs, contexts, int(t.batch_size), int(config.seed))
    state, info = run_lib.train_beside_teacher(
        networks, phases, params, pipe, uncond, batch_fn, config, workdir, progress, "LCM step"
    )
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
    student, `sampling_defaults` steps = eval.student_steps[0], no CFG), the grid and the NFE-vs-quality report."""
    from pathlib import Path

    from jaxdiff.distill import run as run_lib
    from jaxdiff.sampling.pipeline import load_pipeline

    out = Path(out)
    params, info, seconds = run_lib.timed(
        train, config, pipe, init_params, pairs, contexts, uncond, str(out / "train"), progress
    )
    sched = student_scheduler(pipe.scheduler_config, config.lcm)
    run_lib.save_student(pipe, params, out, int(config.eval.student_steps[0]), sched)
    student = load_pipeline(out / "model")
    settings = {"lcm": {k: (v if isinstance(v, str) else float(v)) for k, v in dict(config.lcm).items()}}

    def sample_student(pipe_, params_, prompts, latents, steps):
        return np.asarray(student(list(prompts), steps=int(steps), guidance=1.0, latents=latents))

    return run_lib.write_report(config, pipe, params, out, info, seconds, settings, sample_student, "LCM")
