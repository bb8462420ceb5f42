"""Rectified flow on a text-to-image UNet: 2-rectified flow (reflow) and InstaFlow's one-step distillation.

Formulas from `shared/specs/distill_metrics.md` §1 (RectifiedFlow losses.py / sampling.py, InstaFlow pipeline_rf.py):

- Time: t ∈ [0, 1], t = 0 noise (z0), t = 1 data (z1, the teacher's latent); X_t = t z1 + (1 − t) z0 (§1.1).
- Training times (§1.5 `reflow_t_schedule`): "uniform" t = u(1 − eps) + eps; "t0" t = eps (one-step
  distillation); "t1" t = 1; an integer k: t = randint(0, k)(1 − eps)/k + eps.
- UNet time: InstaFlow's (1 − t)·1000 (§1.8), so the noise end sits at SD's noisiest timestep.
- Output: the student's UNet output is read as the flow velocity of diffusers' FlowMatchEulerDiscreteScheduler,
  u = z0 − z1 (= −v_RF), so `FlowEuler` samples it unchanged (x ← x + (σ_next − σ) u, σ = 1 − t). InstaFlow's own
  pipeline reads the output as v_RF = z1 − z0 and steps z ← z + dt·v; the two differ only by the sign, chosen here
  so that an ε-prediction teacher's output (≈ the noise at σ = 1) starts near the target.
- Reflow loss (§1.2, `reduce_mean=True`): mean over C·H·W of ‖v_RF − (z1 − z0)‖², then the batch mean.
- One-step distillation (§1.5 't0', InstaFlow "Distill"): D(z1, x̂1) with x̂1 = X_t + (1 − t)·v_RF(X_t, t) (the
  straight-line extrapolation of §1.3; = z0 + v(z0) at t = 0). D = L2 (per-sample mean, loss "distill_l2"), or
  "distill_probe": the paper's second stage uses LPIPS, D = ‖φ(decode(x̂1)) − φ(decode(z1))‖²; on shapes the
  shapes probe's penultimate features play φ (`probe_perceptual`; mean over the features, then the batch mean),
  mixed as perceptual_weight·D_probe + l2_weight·D_L2 (defaults 1 and 0). "distill_lpips" is the paper's: D =
  LPIPS(decode(x̂1), decode(z1)) (`jaxdiff.metrics.lpips` on user-supplied weights, `rectified_flow.perceptual_weights`
  = a state dict of lpips.LPIPS, `lpips_net` vgg or alex; `lpips_perceptual`; the batch mean), mixed likewise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.sampling import denoise
from jaxdiff.sampling.schedulers.flow_euler import FlowEuler, FlowPlan

T_SCHEDULES = ("uniform", "t0", "t1")
LOSSES = ("l2", "distill_l2", "distill_probe", "distill_lpips")
# losses through the VAE decoder and a feature network (`make_loss(perceptual=)`)
PERCEPTUAL = ("distill_probe", "distill_lpips")
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


def _b(a, x):
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def _mean_per_sample(x):
    return jnp.mean(jnp.reshape(x, (x.shape[0], -1)), axis=1)


def sample_t(key, batch: int, schedule, eps: float) -> jax.Array:
    """Training times [B] of `reflow_t_schedule` (§1.5)."""
    if schedule == "uniform":
        return jax.random.uniform(key, (batch,)) * (1.0 - eps) + eps
    if schedule == "t0":
        return jnp.full((batch,), eps, jnp.float32)
    if schedule == "t1":
        return jnp.ones((batch,), jnp.float32)
    if isinstance(schedule, int) and schedule > 0:
        return jax.random.randint(key, (batch,), 0, schedule).astype(jnp.float32) * (1.0 - eps) / schedule + eps
    raise UserError(f"t_schedule must be one of {', '.join(T_SCHEDULES)} or a positive integer k, got {schedule!r}")


def interpolate(z0, z1, t):
    """X_t = t z1 + (1 − t) z0 (t = 0 noise, t = 1 data)."""
    return _b(t, z0) * z1 + (1.0 - _b(t, z0)) * z0


def unet_timestep(t, num_train_timesteps: int = 1000):
    """InstaFlow's UNet time (1 − t)·1000: t = 0 (noise) is timestep 1000."""
    return (1.0 - t) * num_train_timesteps


def rf_velocity_of(output):
    """v_RF = z1 − z0 from the student's output, a diffusers flow velocity z0 − z1."""
    return -output


def reflow_loss(v_rf, z0, z1):
    """§1.2: mean over samples of mean_{C,H,W} ‖v − (z1 − z0)‖²."""
    return jnp.mean(_mean_per_sample(jnp.square(v_rf - (z1 - z0))))


def extrapolate(x_t, t, v_rf):
    """x̂1 = X_t + (1 − t) v (§1.3, the one-step prediction from X_t)."""
    return x_t + (1.0 - _b(t, x_t)) * v_rf


def distill_l2(x1_hat, z1):
    """InstaFlow's distillation with D = L2: mean over samples of mean_{C,H,W} ‖x̂1 − z1‖²."""
    return jnp.mean(_mean_per_sample(jnp.square(x1_hat - z1)))


def perceptual_distance(features, x1_hat, z1):
    """Mean over samples of mean_D (φ(x̂1) − φ(z1))², φ = `features` (latents [B, h, w, c] -> [B, D]); one call on
    [x̂1; z1], the target's features held fixed."""
    f = features(jnp.concatenate([x1_hat, z1]))
    f_hat, f_tgt = jnp.split(f, 2)
    return jnp.mean(_mean_per_sample(jnp.square(f_hat - jax.lax.stop_gradient(f_tgt))))


def decode_unclipped(pipe, vae_params, latents):
    """The pipeline's VAE decode as `pipe.decode_latents` without its final clip to [0, 1] (which zeroes the
    gradient of saturated pixels): images [B, H, W, 3], ~[0, 1]."""
    z = latents / pipe.vae.config.get("scaling_factor", 0.18215)
    if pipe.vae.config.get("shift_factor") is not None:
        z = z + pipe.vae.config["shift_factor"]
    return pipe.vae.decode(vae_params, z) / 2 + 0.5


def probe_perceptual(pipe, probe=None):
    """φ(decode(z)) for "distill_probe": the shapes probe's (`jaxdiff.metrics.probe`, a Flax module) penultimate
    features [B, D] of the pipeline's VAE decode of latents [B, h, w, c], differentiable in z. The VAE and probe
    params are closed over (constants of the step's program: both are small for shapes; the shipped probe by
    default). A decode of another size than the probe reads (32x32) is a UserError."""
    from jaxdiff.metrics import probe as probe_lib

    probe = probe_lib.load_probe() if probe is None else probe
    size = int(probe.config["image_size"])
    vae_params, probe_params = pipe.vae.params, probe.params

    def features(z):
        images = decode_unclipped(pipe, vae_params, z.astype(jnp.float32))
        if images.shape[1:3] != (size, size):
            raise UserError(
                f"rectified_flow.loss=distill_probe: the teacher decodes {images.shape[1]}x{images.shape[2]} images, "
                f"the shapes probe reads {size}x{size} (a shapes teacher)"
            )
        return probe.module.apply({"params": probe_params}, images)[1]

    return features


def lpips_perceptual(pipe, model):
    """D(x̂1, z1) [B] for "distill_lpips": LPIPS (`model`, a `jaxdiff.metrics.lpips.LPIPS`) of the pipeline's VAE
    decodes (unclipped, ~[0, 1]: normalize=True maps them to [−1, 1]) of latents [B, h, w, c], differentiable in
    x̂1; one decode of [x̂1; z1], the target's images held fixed. VAE and LPIPS params are closed over."""
    from jaxdiff.metrics import lpips as lpips_lib

    vae_params, params, net = pipe.vae.params, model.params, model.net

    def distance(x1_hat, z1):
        images = decode_unclipped(pipe, vae_params, jnp.concatenate([x1_hat, z1]).astype(jnp.float32))
        hat, tgt = jnp.split(images, 2)
        return lpips_lib.lpips_distance(params, hat, jax.lax.stop_gradient(tgt), net, normalize=True)

    return distance


LPIPS_WEIGHTS_HELP = (
    "LPIPS needs the VGG/AlexNet LPIPS network and its weights, which jaxdiff does not ship or download: set "
    "rectified_flow.perceptual_weights to a state dict of lpips.LPIPS (.pth/.safetensors/.npz: the lpips package's "
    "weights/v0.1/vgg.pth merged with torchvision's vgg16 backbone; the recipe is in jaxdiff.metrics.lpips), e.g. "
    "--config configs/distill/instaflow.py:shapes,lpips --config.rectified_flow.perceptual_weights=lpips_vgg.pth; "
    "on shapes distill_probe (the shapes probe's features) needs no weights"
)


def perceptual_settings(config) -> dict:
    """make_loss's perceptual keywords from the config's `rectified_flow` block: {} for the L2 losses; for
    "distill_probe" the teacher pipeline's VAE and the shapes probe (`rectified_flow.probe`: a probe folder, "" or
    absent = the shipped one) as `perceptual`, and `perceptual_weight` / `l2_weight` (absent: 1 and 0; the
    instaflow config's "probe" variant sets them); for "distill_lpips" `lpips_perceptual` on the LPIPS weights at
    `rectified_flow.perceptual_weights` (`lpips_net`: vgg, the default, or alex; the "lpips" variant's keys)."""
    r = config.rectified_flow
    if str(r.loss) not in PERCEPTUAL:
        return {}
    from jaxdiff.metrics import probe as probe_lib
    from jaxdiff.sampling.pipeline import load_pipeline

    if str(r.loss) == "distill_lpips":  # `perceptual_weights` (and `lpips_net`): keys the "lpips" variant adds
        from jaxdiff.metrics import lpips as lpips_lib

        if not r.get("perceptual_weights"):
            raise UserError(f"rectified_flow.loss=distill_lpips: {LPIPS_WEIGHTS_HELP}")
        model = lpips_lib.load_lpips(str(r.perceptual_weights), str(r.get("lpips_net", "vgg")))
        return {
            "perceptual": lpips_perceptual(load_pipeline(config.teacher), model),
            "perceptual_weight": float(r.get("perceptual_weight", 1.0)),
            "l2_weight": float(r.get("l2_weight", 0.0)),
        }

    probe = probe_lib.load_probe(r.get("probe") or None)
    return {
        "perceptual": probe_perceptual(load_pipeline(config.teacher), probe),
        "perceptual_weight": float(r.get("perceptual_weight", 1.0)),
        "l2_weight": float(r.get("l2_weight", 0.0)),
    }


def make_loss(
    unet_apply,
    t_schedule,
    eps: float,
    loss: str,
    num_train_timesteps: int = 1000,
    perceptual=None,
    perceptual_weight: float = 1.0,
    l2_weight: float = 0.0,
):
    """loss_fn(params, frozen, batch, rng) for `jaxdiff.train.step.Phase` on network "unet"; batch: z0, z1
    [B, h, w, c] and context [B, L, D]. "distill_probe" needs `perceptual` (latents -> features [B, D], e.g.
    `probe_perceptual(pipe)`) and is perceptual_weight·D_probe + l2_weight·D_L2; "distill_lpips" needs `perceptual`
    ((x̂1, z1) -> distances [B], `lpips_perceptual(pipe, model)`) and mixes its batch mean likewise."""
    if loss == "distill_lpips" and perceptual is None:
        raise UserError(
            f"rectified_flow.loss=distill_lpips needs make_loss(perceptual=lpips_perceptual(pipe, "
            f"jaxdiff.metrics.lpips.load_lpips(path))): {LPIPS_WEIGHTS_HELP}"
        )
    if loss not in LOSSES:
        raise UserError(f"rectified_flow.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if loss in PERCEPTUAL and perceptual is None:
        raise UserError(f"rectified_flow.loss={loss} needs the perceptual network (make_loss(perceptual=...))")

    def loss_fn(params, frozen, batch, rng):
        z0, z1, ctx = batch["z0"], batch["z1"], batch["context"]
        t = sample_t(rng, z0.shape[0], t_schedule, eps)
        x_t = interpolate(z0, z1, t)
        out = unet_apply(params["unet"], x_t, unet_timestep(t, num_train_timesteps), ctx).astype(jnp.float32)
        v = rf_velocity_of(out)
        if loss == "l2":
            return reflow_loss(v, z0, z1), {"t_mean": jnp.mean(t)}
        x1_hat = extrapolate(x_t, t, v)
        l2 = distill_l2(x1_hat, z1)
        if loss == "distill_l2":
            return l2, {"t_mean": jnp.mean(t)}
        if loss == "distill_lpips":
            d = jnp.mean(perceptual(x1_hat, z1))
        else:
            d = perceptual_distance(perceptual, x1_hat, z1)
        value = float(perceptual_weight) * d + float(l2_weight) * l2
        return value, {"t_mean": jnp.mean(t), "perceptual": d, "l2": l2}

    return loss_fn


def build(config, unet_fn, features_fn=None, scheduler_config=None, latent_shape=None):
    """(networks, phases) of a reflow / InstaFlow step: one network "unet" (the train block's optimiser, schedule,
    clipping and EMA), one phase on `make_loss` with the config's `rectified_flow` block. `unet_fn(params, x, t,
    context)`; the other arguments are the other methods' (`jaxdiff.distill.*.build`) and unused here."""
    from jaxdiff.erase import finetune
    from jaxdiff.train import step as step_lib

    t, r = config.train, config.rectified_flow
    schedule = int(r.t_schedule) if str(r.t_schedule).isdigit() else str(r.t_schedule)
    loss = make_loss(unet_fn, schedule, float(r.eps), str(r.loss), **perceptual_settings(config))
    lr = finetune.schedule(t)
    network = step_lib.Network(
        "unet", finetune.optimizer(t, lr), lr, clip_norm=float(t.max_grad_norm), ema_decay=float(t.ema_decay)
    )
    return [network], [step_lib.Phase("unet", "unet", loss)]


def initial_params(config, student, teacher, features_fn=None, latent_shape=None, context=None) -> dict:
    """{"unet": the student's initial UNet params} (the other arguments: as the other methods')."""
    return {"unet": student}


# ------------------------------------------------------------------------------------------------ sampling


def uniform_plan(steps: int, num_train_timesteps: int = 1000) -> FlowPlan:
    """RectifiedFlow's Euler (§1.3, InstaFlow's pipeline): σ_i = 1 − i/N, UNet time σ_i·1000, i = 0..N−1.
    (diffusers' FlowMatchEuler spacing, which `pipe(..., scheduler="flow_euler")` uses, puts its N−1 steps on
    linspace(1, 1/1000) and a last tiny one: equal for N = 1, about N − 1 uniform steps otherwise.)"""
    if steps < 1:
        raise UserError(f"steps must be positive, got {steps}")
    sigmas = 1.0 - np.arange(steps + 1, dtype=np.float64) / steps
    s32 = sigmas.astype(np.float32)
    return FlowPlan(
        timesteps=jnp.asarray(s32[:-1] * np.float32(num_train_timesteps)),
        init_noise_sigma=jnp.float32(1.0),
        sigmas=jnp.asarray(s32),
    )


_SAMPLERS: dict = {}


def sample(pipe, unet_params, prompts: list[str], latents, steps: int, guidance: float = 1.0) -> np.ndarray:
    """Images [N, H, W, 3] in [0, 1] from a flow student with N uniform Euler steps (one compiled program per
    pipeline, step count and guidance on/off; `denoise.denoise` runs the loop)."""
    use_cfg = guidance > 1.0
    key = (id(pipe), int(steps), use_cfg)
    if key not in _SAMPLERS:
        sched, plan, unet = FlowEuler(FLOW_SCHEDULER), uniform_plan(int(steps)), pipe.unet

        def run(unet_params, vae_params, cond, uncond, z0, g):
            model = lambda x, t, c: unet.apply(unet_params, x, t, c).astype(jnp.float32)  # noqa: E731
            x = denoise.denoise(model, sched, plan, z0, cond, uncond if use_cfg else None, g)
            return pipe.decode_latents(vae_params, x)

        _SAMPLERS[key] = jax.jit(run)
    cond = pipe.encode_prompts(list(prompts))[0]
    uncond = jnp.broadcast_to(pipe.encode_prompts([""])[0], cond.shape)
    out = _SAMPLERS[key](unet_params, pipe.vae.params, cond, uncond, jnp.asarray(latents), jnp.float32(guidance))
    return np.asarray(out)
