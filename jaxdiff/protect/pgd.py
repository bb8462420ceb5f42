"""Diff-Protect (Xue et al., ICLR 2024): encoder-VJP PGD with SDS(±), SDST, AdvDM, PhotoGuard and Mist, one loop."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.sampling.schedulers import common

# mode -> what one step ascends (the sign of the update is taken of this direction):
#   sds-/sds+    s·(∂z/∂x)ᵀ(ε̂ − ε), ε̂ under stop_gradient (the paper's SDS gradient; s = −1 / +1)
#   sdst-/sdst+  s·rate·(∂z/∂x)ᵀ(ε̂ − ε) − ∇ₓ‖z − z_target‖²   (the official `using_target` variant)
#   advdm        ∇ₓ L_S, through the UNet (Liang et al. 2023: maximise the diffusion loss)
#   photoguard   −∇ₓ ‖z − z_target‖²   (Salman et al. 2023, encoder attack, official `texture_only`)
#   mist         −∇ₓ (L_T − w·L_S)      (Liang & Wu 2023, targeted PGD on the fused loss)
MODES = ("sds-", "sds+", "sdst-", "sdst+", "advdm", "photoguard", "mist")
TARGET_MODES = ("sdst-", "sdst+", "photoguard", "mist")


@dataclasses.dataclass(frozen=True)
class ProtectConfig:
    """PGD settings. `eps` and `alpha` are on the [0, 1] pixel scale (the official code doubles them for [−1, 1]):
    defaults ε = 16/255, α = 1/255, 100 steps, no random start (configs/attack/base.yaml; g_mode "−")."""

    mode: str = "sds-"
    eps: float = 16 / 255
    alpha: float = 1 / 255
    steps: int = 100
    target_rate: float = 5.0  # SDST: weight of the SDS term against the target term
    mist_weight: float = 1e4  # Mist: L_T − w·L_S

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"unknown protection mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not 0.0 <= self.eps <= 1.0:
            raise UserError(f"eps must be in [0, 1] (pixel scale; 16/255 = 0.0627), got {self.eps}")
        if not self.alpha > 0.0:
            raise UserError(f"alpha (step size) must be positive, got {self.alpha}")
        if int(self.steps) != self.steps or self.steps < 0:
            raise UserError(f"steps must be a whole number >= 0, got {self.steps}")

    @property
    def sign(self) -> float:
        """s of the SDS modes: −1 minimises the semantic loss (the paper's SDS(−)), +1 ascends it."""
        return -1.0 if self.mode.endswith("-") else 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """The attacked latent diffusion model as pure functions (hashed by identity: one compiled loop per Target).

    encode(vae_params, x [B, H, W, 3] in [−1, 1]) -> (mean, logvar) unscaled; eps(unet_params, z_t, t [B], context)
    -> ε̂; alphas_cumprod [T]; latents are (sample − shift) · scaling_factor as the pipelines use them."""

    encode: Callable
    eps: Callable
    alphas_cumprod: np.ndarray
    scaling_factor: float = 0.18215
    shift_factor: float | None = None

    @classmethod
    def from_pipeline(cls, pipe) -> Target:
        """The Target of an SD 1.x/2.x (or shapes) `Pipeline`."""
        if pipe.is_sdxl:
            raise UserError("protection supports SD 1.x/2.x-style pipelines (one text encoder), not SDXL")
        if pipe.scheduler_config.get("prediction_type", "epsilon") != "epsilon":
            raise UserError("protection needs an epsilon-prediction UNet (the SDS gradient is ε̂ − ε)")
        from jaxdiff.sampling import make_scheduler

        unet = pipe.unet
        return cls(
            encode=pipe.vae.encode,
            eps=lambda p, z, t, c: unet.apply(p, z, t.astype(jnp.float32), c).astype(jnp.float32),
            alphas_cumprod=np.asarray(make_scheduler("ddpm", pipe.scheduler_config).alphas_cumprod, np.float32),
            scaling_factor=float(pipe.vae.config.get("scaling_factor", 0.18215)),
            shift_factor=pipe.vae.config.get("shift_factor"),
        )


def latent(target: Target, vae_params, x, posterior_noise):
    """z = (mean + σ·n − shift) · scaling_factor: a posterior sample of E(x) (LDM get_first_stage_encoding), with the
    posterior noise n given [B, h, w, C]."""
    mean, logvar = target.encode(vae_params, x)
    z = mean + jnp.exp(0.5 * logvar) * posterior_noise
    if target.shift_factor is not None:
        z = z - target.shift_factor
    return z * target.scaling_factor


def _noised(target: Target, z, t, noise):
    return common.add_noise(jnp.asarray(target.alphas_cumprod), z, noise, t)


def sds_gradient(target: Target, params, x, context, t, noise, posterior_noise):
    """g_x = (∂z/∂x)ᵀ (ε̂(z_t, t, c) − ε) with ε̂ under stop_gradient: only the encoder's VJP, no UNet Jacobian and no
    w(t) (Diff-Protect's SDS gradient). x [B, H, W, 3] in [−1, 1], t [B] int, noise / posterior_noise [B, h, w, C]."""
    z, vjp = jax.vjp(lambda x_: latent(target, params["vae"], x_, posterior_noise), x)
    eps_hat = jax.lax.stop_gradient(target.eps(params["unet"], _noised(target, z, t, noise), t, context))
    (g,) = vjp(eps_hat - noise)
    return g


def semantic_loss(target: Target, params, x, context, t, noise, posterior_noise):
    """L_S = mean ‖ε_θ(z_t, t, c) − ε‖² (AdvDM's loss, differentiated through the UNet and the encoder)."""
    z = latent(target, params["vae"], x, posterior_noise)
    return jnp.mean(jnp.square(target.eps(params["unet"], _noised(target, z, t, noise), t, context) - noise))


def textural_loss(target: Target, params, x, z_target, posterior_noise):
    """L_T = ‖E(x) − z_target‖² summed (PhotoGuard's encoder attack; the official MSE with reduction sum)."""
    return jnp.sum(jnp.square(latent(target, params["vae"], x, posterior_noise) - z_target))


def direction(cfg: ProtectConfig, target: Target, params, x, context, z_target, t, noise, posterior_noise):
    """What a step ascends: x ← x + α·sign(direction) (see MODES); every input as in `sds_gradient`."""
    draws = (t, noise, posterior_noise)
    mode = cfg.mode
    if mode in ("sds-", "sds+", "sdst-", "sdst+"):
        g = cfg.sign * sds_gradient(target, params, x, context, *draws)
        if mode.startswith("sdst"):
            g = cfg.target_rate * g - jax.grad(textural_loss, argnums=2)(target, params, x, z_target, posterior_noise)
        return g
    if mode == "advdm":
        return jax.grad(semantic_loss, argnums=2)(target, params, x, context, *draws)
    if mode == "photoguard":
        return -jax.grad(textural_loss, argnums=2)(target, params, x, z_target, posterior_noise)

    def mist(x_):  # mode == "mist"
        l_t = textural_loss(target, params, x_, z_target, posterior_noise)
        return l_t - cfg.mist_weight * semantic_loss(target, params, x_, context, *draws)

    return -jax.grad(mist)(x)


def project(x, x0, eps):
    """The ε-ball around x0 in L∞, then the image range [−1, 1] (eps on the [−1, 1] scale)."""
    return jnp.clip(jnp.clip(x, x0 - eps, x0 + eps), -1.0, 1.0)


def _draws(target: Target, keys, i, latent_shape):
    """Per image: t ~ U{0..T−1}, ε, posterior noise, from its own key folded with the step (batch-independent)."""
    T = target.alphas_cumprod.shape[0]

    def one(k):
        kt, kn, kp = jax.random.split(jax.random.fold_in(k, i), 3)
        return (
            jax.random.randint(kt, (), 0, T),
            jax.random.normal(kn, latent_shape, jnp.float32),
            jax.random.normal(kp, latent_shape, jnp.float32),
        )

    return jax.vmap(one)(keys)


def pgd(cfg: ProtectConfig, target: Target, params, x0, context, keys, x_target=None):
    """Protect images x0 [B, H, W, 3] in [−1, 1] (pure, jit-able; one `lax.fori_loop` over cfg.steps).

    params {"vae", "unet"}; context [B, L, D] (the prompt's text embeddings); keys [B] PRNG keys, one per image;
    x_target [B or 1, H, W, 3] in [−1, 1] for the target modes (E(x_target) is the posterior mean, scaled).
    Returns x [B, H, W, 3] with ‖x − x0‖∞ ≤ 2·cfg.eps and x in [−1, 1]."""
    eps, alpha = 2.0 * cfg.eps, 2.0 * cfg.alpha  # [0, 1] budgets on the [−1, 1] scale, as the official code
    x0 = jnp.asarray(x0, jnp.float32)
    z_target = None
    if cfg.mode in TARGET_MODES:
        if x_target is None:
            raise UserError(f"mode {cfg.mode} needs a target image")
        xt = jnp.broadcast_to(jnp.asarray(x_target, jnp.float32), x0.shape)
        z_target = jax.lax.stop_gradient(latent(target, params["vae"], xt, jnp.zeros(())))
    mean_shape = jax.eval_shape(target.encode, params["vae"], x0)[0].shape[1:]

    def step(i, x):
        t, noise, post = _draws(target, keys, i, mean_shape)
        d = direction(cfg, target, params, x, context, z_target, t, noise, post)
        return project(x + alpha * jnp.sign(d), x0, eps)

    return jax.lax.fori_loop(0, int(cfg.steps), step, x0)


@functools.lru_cache(maxsize=16)
def compiled(cfg: ProtectConfig, target: Target) -> Callable:
    """jax.jit(pgd) for one (config, target): one compile per input shape."""
    return jax.jit(functools.partial(pgd, cfg, target))


def default_target(height: int, width: int, period: int = 4) -> np.ndarray:
    """A stand-in for the official MIST.png target: a black-and-white checkerboard [H, W, 3] in [−1, 1]."""
    yy, xx = np.mgrid[:height, :width]
    board = ((yy // period + xx // period) % 2).astype(np.float32) * 2.0 - 1.0
    return np.repeat(board[..., None], 3, axis=-1)


def protect_images(
    pipe,
    images,
    prompt: str | list[str] = "",
    cfg: ProtectConfig = ProtectConfig(),
    seed: int = 0,
    target_image=None,
    first_index: int = 0,
) -> np.ndarray:
    """Protected copies of `images` [B, H, W, 3] (float in [0, 1] or uint8) against `pipe` (a loaded SD 1.x/2.x or
    shapes Pipeline); `prompt` conditions the UNet (one, or one per image; "" by default). Returns float32 in [0, 1]
    with ‖x − images‖∞ ≤ cfg.eps. `target_image` [H, W, 3] in [0, 1] for the target modes (default: a checkerboard).
    Image i draws its noise from fold_in(PRNGKey(seed), first_index + i): the result does not depend on batching."""
    fn, args = prepare(pipe, images, prompt, cfg, seed, target_image, first_index)
    return finish(fn(*args))


def prepare(pipe, images, prompt="", cfg: ProtectConfig = ProtectConfig(), seed=0, target_image=None, first_index=0):
    """(compiled function, its arguments) of `protect_images` with the same inputs, so that a caller can compile
    ahead (`fn.lower(*args).compile()`) and time the run alone; `finish(fn(*args))` is the result."""
    from jaxdiff.sampling.image_conditioning import as_image_batch

    x = np.asarray(images)
    if x.ndim != 4 or x.shape[0] == 0:
        raise UserError(f"images must be a non-empty [B, H, W, 3] batch, got shape {x.shape}")
    x = as_image_batch(x, x.shape[0])
    b, h, w = x.shape[:3]
    factor = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.get("block_out_channels", (0,) * 4)) - 1)
    if h % factor or w % factor:
        raise UserError(f"image size {h}x{w} is not a multiple of {factor}, which this model needs")
    prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
    if len(prompts) != b:
        raise UserError(f"{len(prompts)} prompts for {b} images (give one prompt or one per image)")
    context, _ = pipe.encode_prompts(prompts)
    if target_image is None:
        xt = default_target(h, w)
    else:
        xt = as_image_batch(target_image, 1)[0] * 2.0 - 1.0
        if xt.shape[:2] != (h, w):
            raise UserError(f"the target image is {xt.shape[0]}x{xt.shape[1]}, the images {h}x{w}")
    params = {"vae": pipe.vae.params, "unet": pipe.unet.params}
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(first_index + jnp.arange(b))
    return compiled(cfg, _target(pipe)), (params, x * 2.0 - 1.0, context, keys, xt[None])


def finish(out) -> np.ndarray:
    """`pgd`'s output on [−1, 1] -> float32 images in [0, 1]."""
    return np.clip((np.asarray(out, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def _target(pipe) -> Target:
    """One Target per pipeline (kept in its compiled-program cache, so `compiled` reuses its program)."""
    if "protect_target" not in pipe._compiled:
        pipe._compiled["protect_target"] = Target.from_pipeline(pipe)
    return pipe._compiled["protect_target"]
