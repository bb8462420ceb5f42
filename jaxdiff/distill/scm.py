"""sCM: continuous-time consistency distillation in TrigFlow with `jax.jvp` (tangent warm-up and normalisation,
adaptive log-variance weighting) on a VP teacher, as NVlabs/FastGen's `sCM.py`; rCM: + DMD2's distribution-matching
term with its fake score (NVlabs/rcm; `distill_anchors.md` §1)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.distill import sid
from jaxdiff.distill import teacher as teacher_lib
from jaxdiff.errors import UserError

# ------------------------------------------------------------------------------------------------ TrigFlow <-> VP


def _bc(a, x):
    return jnp.reshape(a, jnp.shape(a) + (1,) * (x.ndim - jnp.ndim(a)))


def trig_time(alpha, sigma, sigma_data: float):
    """TrigFlow time of a VP noise level: t̂ = atan2(σ_t, α_t σ_d) (SNR matching: x̂_t = cos t̂ x0 + sin t̂ z with
    z ~ N(0, σ_d² I) has the VP point's signal-to-noise ratio)."""
    return jnp.arctan2(sigma, alpha * sigma_data)


def vp_input(acp, x_hat, t_hat, sigma_data: float):
    """(x_vp, timestep) of the TrigFlow point (x̂_t, t̂): σ_EDM = σ_d tan t̂, the fractional VP timestep with that
    σ_EDM (`sid.timestep_of_sigma`, exact on the linearly interpolated ᾱ) and x_vp = x̂ √(α² + (σ/σ_d)²) (= α x̂ / cos t̂).
    Differentiable in t̂ (the tangent's ∂/∂t̂ goes through the timestep and the scaling)."""
    sigma_edm = sigma_data * jnp.tan(t_hat)
    timestep = sid.timestep_of_sigma(acp, sigma_edm)
    alpha = 1.0 / jnp.sqrt(1.0 + sigma_edm**2)
    coeff = jnp.sqrt(alpha**2 + (sigma_edm * alpha / sigma_data) ** 2)
    return x_hat * _bc(coeff, x_hat), timestep


def trig_flow(model: teacher_lib.Teacher, params, x_hat, t_hat, context, sigma_data: float, acp):
    """F(x̂_t/σ_d, t̂) of a VP UNet: its x̂0 at the matching VP point turned into TrigFlow's velocity over σ_d,
    (cos t̂ x̂_t − x̂0) / (sin t̂ σ_d) (FastGen's `TrigFlowPrecond`). Then f = cos t̂ x̂_t − sin t̂ σ_d F = x̂0: the
    consistency function is the UNet's own x0 prediction."""
    x_vp, timestep = vp_input(acp, x_hat, t_hat, sigma_data)
    x0 = model.predict(params, x_vp, timestep, context, "sample").astype(jnp.float32)
    return (_bc(jnp.cos(t_hat), x_hat) * x_hat - x0) / (_bc(jnp.sin(t_hat), x_hat) * sigma_data)


# ------------------------------------------------------------------------------------------------ the loss


def tangent(F_minus, F_jvp, x_hat, dxt_dt, t_hat, sigma_data: float, warmup: float, const: float = 0.1):
    """g = −cos² t̂ (σ_d F⁻ − dx̂/dt) − r (cos t̂ sin t̂ x̂_t + σ_d F_jvp), F_jvp = cos t̂ sin t̂ dF⁻/dt̂ (the JVP with
    tangents (cos sin · dx̂/dt, cos sin)), r the tangent warm-up; normalised per sample g / (‖g‖ + c)."""
    c, s = _bc(jnp.cos(t_hat), x_hat), _bc(jnp.sin(t_hat), x_hat)
    g = -(c * c) * (sigma_data * F_minus - dxt_dt) - warmup * (c * s * x_hat + sigma_data * F_jvp)
    norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)), keepdims=True))
    return g / (norm + const)


def weighted_loss(F, F_minus, g, logvar):
    """Per sample: mean((F − sg(F⁻) − g)²) / e^{logvar} + logvar (adaptive weighting; the unweighted term is a
    mean over the sample's elements, FastGen's D = 1)."""
    unweighted = jnp.mean(jnp.square(F - jax.lax.stop_gradient(F_minus) - g), axis=tuple(range(1, F.ndim)))
    return unweighted * jnp.exp(-logvar) + logvar, unweighted


class LogVar(nn.Module):
    """The adaptive weight's log-variance of t̂: fixed Fourier features of t̂ (64), then a linear map (zero-init:
    logvar 0 at the start)."""

    features: int = 64

    @nn.compact
    def __call__(self, t_hat):
        freqs = jax.random.normal(jax.random.PRNGKey(0), (self.features,))
        phases = jax.random.uniform(jax.random.PRNGKey(1), (self.features,))
        f = jnp.cos(2 * jnp.pi * (t_hat[:, None] * freqs + phases)) * np.sqrt(2)
        return nn.Dense(1, kernel_init=nn.initializers.zeros)(f)[:, 0]


def sample_trig_times(key, batch: int, acp, sigma_data: float, p_mean: float = -1.0, p_std: float = 1.4):
    """t̂ = arctan(σ / σ_d) with ln σ ~ N(P_mean, P_std²) (sCM's proposal), σ clipped to the teacher's range."""
    lo, hi = sid.sigma_range(acp)
    sigma = jnp.clip(jnp.exp(p_mean + p_std * jax.random.normal(key, (batch,))), lo, hi)
    return jnp.arctan(sigma / sigma_data)


# ------------------------------------------------------------------------------------------------ the phase


def make_phases(unet_fn, scheduler_config: dict, settings, dmd_settings=None, features_fn=None, jvp_unet_fn=None):
    """One phase on network "unet" = {"unet": student UNet params, "logvar": LogVar params}; batch "x0" [B, h, w, c]
    (the teacher's latents from the pair store), "context"; `frozen` "teacher", "uncond".

    x̂_t = cos t̂ x0 + sin t̂ z (z ~ N(0, σ_d² I)); dx̂/dt = σ_d F_teacher, guided u + w (c − u) with w = `guidance`;
    (F⁻, F_jvp) = jax.jvp of the student's stop-gradient F at (x̂_t, t̂) with tangents (cos sin · dx̂/dt, cos sin); r =
    min(1, step / tangent_warmup_steps); loss = mean_batch weighted_loss(F_θ, F⁻, tangent(...), logvar(t̂)).

    rCM (`dmd_weight` > 0, `dmd_settings` = a dmd2 block): first DMD2's fake score `fake_updates` times (network
    "fake_score" = {"unet"}), then the student on scm_weight · sCM + dmd_weight · DMD2's generator loss of its own
    (backward-simulated) samples (rCM: sCM × 100 + DMD × 1, the student every 5 fake-score updates); the batch then
    also holds "gen_context" and "gen_teacher_context".

    `jvp_unet_fn`: the same UNet for the `jax.jvp` (default `unet_fn`), built with an attention forward mode can go
    through (`Model.for_forward_mode`: on TPU / GPU XLA's attention in place of the splash / cuDNN kernels, whose
    custom VJPs allow reverse mode only); the student's own F, the one differentiated, keeps `unet_fn`'s."""
    from jaxdiff.train import step as step_lib

    s = dict(settings)
    model = teacher_lib.Teacher(unet_fn, dict(scheduler_config))
    if model.is_flow:
        raise UserError("sCM here distills a VP (ε / v / x0) teacher")
    acp = jnp.asarray(model.alphas_cumprod(), jnp.float32)
    sd, w = float(s["sigma_data"]), float(s["guidance"])
    warmup_steps = max(int(s["tangent_warmup_steps"]), 1)
    logvar_head = LogVar()

    jvp_model = model if jvp_unet_fn is None else teacher_lib.Teacher(jvp_unet_fn, dict(scheduler_config))

    def F_of(params, x_hat, t_hat, ctx):
        return trig_flow(model, params, x_hat, t_hat, ctx, sd, acp)

    def F_forward_mode(params, x_hat, t_hat, ctx):
        return trig_flow(jvp_model, params, x_hat, t_hat, ctx, sd, acp)

    def student_loss(params, frozen, batch, rng):
        k_t, k_z = jax.random.split(rng)
        x0, ctx = batch["x0"], batch["context"]
        b = x0.shape[0]
        t_hat = sample_trig_times(k_t, b, model.alphas_cumprod(), sd, float(s["p_mean"]), float(s["p_std"]))
        z = sd * jax.random.normal(k_z, x0.shape)
        x_hat = _bc(jnp.cos(t_hat), x0) * x0 + _bc(jnp.sin(t_hat), x0) * z
        teacher = frozen["teacher"]
        F_c = F_of(teacher, x_hat, t_hat, ctx)
        if w != 1.0:
            F_u = F_of(teacher, x_hat, t_hat, jnp.broadcast_to(frozen["uncond"], ctx.shape))
            F_c = teacher_lib.cfg_uncond_based(F_c, F_u, w)
        dxt_dt = jax.lax.stop_gradient(sd * F_c)
        student = params["unet"]
        fixed = jax.lax.stop_gradient(student["unet"])
        v_t = jnp.cos(t_hat) * jnp.sin(t_hat)
        F_minus, F_jvp = jax.jvp(
            lambda x, t: F_forward_mode(fixed, x, t, ctx), (x_hat, t_hat), (_bc(v_t, x_hat) * dxt_dt, v_t)
        )
        r = jnp.minimum(1.0, frozen["step"].astype(jnp.float32) / warmup_steps)
        g = jax.lax.stop_gradient(tangent(F_minus, F_jvp, x_hat, dxt_dt, t_hat, sd, r, float(s["tangent_const"])))
        F = F_of(student["unet"], x_hat, t_hat, ctx)
        logvar = logvar_head.apply({"params": student["logvar"]}, t_hat)
        rows, unweighted = weighted_loss(F, F_minus, g, logvar)
        return jnp.mean(rows), {"unweighted": jnp.mean(unweighted), "logvar": jnp.mean(logvar), "warmup": r}

    w_scm, w_dmd = float(s.get("scm_weight", 1.0)), float(s.get("dmd_weight", 0.0))
    if w_dmd <= 0:
        return [step_lib.Phase("student", "unet", student_loss)]
    from jaxdiff.distill import dmd2

    fake_loss, dm_loss = dmd2.make_losses(unet_fn, features_fn, scheduler_config, dmd_settings)
    as_dmd = lambda params: {**params, "unet": params["unet"]["unet"]}  # noqa: E731  (the student's UNet alone)

    def rcm_loss(params, frozen, batch, rng):
        k_scm, k_dmd = jax.random.split(rng)
        scm_value, aux = student_loss(params, frozen, batch, k_scm)
        dmd_value, dmd_aux = dm_loss(as_dmd(params), frozen, batch, k_dmd)
        aux.update(loss_scm=scm_value, loss_dmd=dmd_value, dm_grad_norm=dmd_aux["dm_grad_norm"])
        return w_scm * scm_value + w_dmd * dmd_value, aux

    return [
        step_lib.Phase(
            "fake_score",
            "fake_score",
            lambda params, frozen, batch, rng: fake_loss(as_dmd(params), frozen, batch, rng),
            repeat=int(dmd_settings["fake_updates"]),
        ),
        step_lib.Phase("student", "unet", rcm_loss),
    ]


def init_logvar(seed: int = 0):
    return LogVar().init(jax.random.PRNGKey(seed), jnp.zeros((1,), jnp.float32))["params"]


# ------------------------------------------------------------------------------------------------ training


def uses_dmd(config) -> bool:
    """rCM: the config's sCM has a DMD2 term (`scm.dmd_weight` > 0)."""
    return float(config.scm.dmd_weight) > 0


def build(config, unet_fn, features_fn, scheduler_config: dict, latent_shape=None, jvp_unet_fn=None):
    """(networks, phases) of an sCM / rCM step: the student ("unet" = {"unet", "logvar"}, the train block's
    optimiser, schedule, clipping and EMA), with rCM first DMD2's fake score ("fake_score", `dmd2.adamw_network` at
    dmd2.fake_score_learning_rate); the phases of `make_phases` with the config's `scm` block (and `dmd2` block on
    latents of `latent_shape` (h, w, c) for rCM). `features_fn`: the UNet's bottleneck (rCM with a GAN head only);
    `jvp_unet_fn`: the UNet for the tangent's `jax.jvp` (see `make_phases`)."""
    from jaxdiff.distill import dmd2
    from jaxdiff.erase import finetune
    from jaxdiff.train import step as step_lib

    t = config.train
    rcm = uses_dmd(config)
    dmd_settings = dict(config.dmd2, latent_shape=tuple(latent_shape)) if rcm else None
    phases = make_phases(
        unet_fn, scheduler_config, config.scm, dmd_settings, features_fn if rcm else None, jvp_unet_fn=jvp_unet_fn
    )
    lr = finetune.schedule(t)
    networks = [
        step_lib.Network(
            "unet", finetune.optimizer(t, lr), lr, clip_norm=float(t.max_grad_norm), ema_decay=float(t.ema_decay)
        )
    ]
    if rcm:
        networks.insert(0, dmd2.adamw_network("fake_score", config.dmd2.fake_score_learning_rate, t))
    return networks, phases


def initial_params(config, student, teacher, features_fn=None, latent_shape=None, context=None) -> dict:
    """{"unet": {"unet": a copy of the student, "logvar": a fresh `LogVar`}} and with rCM "fake_score": {"unet": a
    copy of the teacher}."""
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # noqa: E731  (no buffer shared with the teacher)
    params = {"unet": {"unet": copy(student), "logvar": init_logvar(int(config.seed))}}
    if uses_dmd(config):
        params["fake_score"] = {"unet": copy(teacher)}
    return params


def train(config, pipe, init_params, pairs: dict, contexts, uncond, workdir: str, progress: bool):
    """The student {"unet", "logvar"} on the runner (AdamW of the train block), with rCM also DMD2's fake score
    (a copy of the teacher, AdamW β 0.9/0.999 at dmd2.fake_score_learning_rate); returns (student UNet, info)."""
    from jaxdiff.distill import dmd2
    from jaxdiff.distill import run as run_lib

    t = config.train
    unet = pipe.unet
    unet_fn = jax.jit(lambda p, x, tt, ctx: unet.apply(p, x, tt, ctx))
    forward_mode = unet.for_forward_mode()
    jvp_unet_fn = jax.jit(lambda p, x, tt, ctx: forward_mode.apply(p, x, tt, ctx))
    rcm = uses_dmd(config)
    latent_shape, features_fn = None, None
    if rcm:
        latent_shape = dmd2.settings_of(config, pipe)["latent_shape"]
        features_fn = jax.jit(lambda p, x, tt, ctx: unet.apply(p, x, tt, ctx, method="encode")["mid"])
    networks, phases = build(config, unet_fn, features_fn, pipe.scheduler_config, latent_shape, jvp_unet_fn)
    seed = int(config.seed)
    pair_batch = run_lib.pair_batches(pairs, contexts, int(t.batch_size), seed)

    def batch_fn(step: int) -> dict:
        batch = pair_batch(step)
        if rcm:  # DMD2's prompts for the student's own samples (data-free)
            gen = contexts[np.random.default_rng([seed, 8, step]).integers(0, len(contexts), size=int(t.batch_size))]
            batch.update(gen_context=gen, gen_teacher_context=gen)
        return batch

    params = initial_params(config, init_params, pipe.unet.params)
    label = "rCM step" if rcm else "sCM step"
    state, info = run_lib.train_beside_teacher(
        networks, phases, params, pipe, uncond, batch_fn, config, workdir, progress, label
    )
    return state.ema_params("unet")["unet"], info


# ------------------------------------------------------------------------------------------------ the command


def distill(config, pipe, init_params, pairs, contexts, uncond, out, progress: bool = True) -> dict:
    """`jaxdiff distill` for method "scm" (run.distill hands over after the pairs): train, OUT/model (LCMScheduler
    with original_inference_steps = the largest student step count: x̂0, fresh noise, x̂0 …), the grid, the report."""
    from pathlib import Path

    from jaxdiff.distill import dmd2
    from jaxdiff.distill import run as run_lib

    out = Path(out)
    params, info, seconds = run_lib.timed(
        train, config, pipe, init_params, pairs, contexts, uncond, str(out / "train"), progress
    )
    k = max(int(n) for n in config.eval.student_steps)
    sched = dmd2.student_scheduler(pipe.scheduler_config, k)
    run_lib.save_student(pipe, params, out, int(config.eval.student_steps[0]), sched)
    settings = {"scm": dict(config.scm) | ({"dmd2": dict(config.dmd2)} if float(config.scm.dmd_weight) > 0 else {})}

    def sample_student(pipe, params, prompts, latents, steps):
        return dmd2.sample(pipe, params, prompts, latents, steps, k)

    return run_lib.write_report(config, pipe, params, out, info, seconds, settings, sample_student, "student")
