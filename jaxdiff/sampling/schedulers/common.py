"""Shared scheduler pieces: diffusers-exact betas/alphas, timestep spacing, sigmas, base class, training noising."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")


# --------------------------------------------------------------------------------------------- config


def resolve_config(defaults: dict, config: dict | None) -> dict:
    """As diffusers' from_config: known keys take the given value, missing ones the default; others are ignored."""
    config = dict(config or {})
    return {k: (config[k] if k in config else v) for k, v in defaults.items()}


def check(cfg: dict, key: str, allowed, name: str):
    """ValueError naming `key` unless cfg[key] is one of `allowed`."""
    if cfg[key] not in allowed:
        raise UserError(f"{name}: unsupported {key}={cfg[key]!r} (supported: {', '.join(map(repr, allowed))})")


def check_common(cfg: dict, name: str, predictions=("epsilon", "v_prediction", "sample")):
    """The checks shared by the alphas_cumprod schedulers."""
    if "thresholding" in cfg:
        check(cfg, "thresholding", (False,), name)
    if "timestep_spacing" in cfg:
        check(cfg, "timestep_spacing", SPACINGS, name)
    check(cfg, "prediction_type", predictions, name)
    if cfg.get("trained_betas") is None:
        check(cfg, "beta_schedule", BETA_SCHEDULES + (("sigmoid",) if name == "ddpm" else ()), name)


def check_steps(n, num_train_timesteps: int, limit: bool = True) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"num_inference_steps must be a positive integer, got {n!r}")
    if limit and n > num_train_timesteps:
        raise UserError(f"num_inference_steps={n} cannot be larger than num_train_timesteps={num_train_timesteps}")
    return int(n)


# ---------------------------------------------------------------------------------- betas and alphas


def torch_linspace32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace reproducing torch.linspace's CPU kernel: fused multiply-add from the nearer end."""
    a, b = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([a], np.float32)
    step = np.float32((b - a) / np.float32(n - 1))
    idx = np.arange(n)
    lo = (np.float64(step) * idx + np.float64(a)).astype(np.float32)
    hi = (np.float64(-step) * (n - 1 - idx) + np.float64(b)).astype(np.float32)
    return np.where(idx < n // 2, lo, hi)


def cumprod32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod on float32 CPU accumulates in float64 and rounds each output."""
    return np.cumprod(np.asarray(x, np.float64)).astype(np.float32)


def betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    """The squaredcos_cap_v2 (cosine) schedule, computed in Python floats as diffusers does."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1), float32 as diffusers."""
    acp = cumprod32(np.float32(1.0) - betas)
    s = np.sqrt(acp)
    s0, st = s[0], s[-1]
    s = (s - st) * (s0 / (s0 - st))
    ab = s * s
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_betas(cfg: dict) -> np.ndarray:
    """float32 betas [num_train_timesteps] from a resolved config (trained_betas / beta_schedule)."""
    n, b0, b1 = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], np.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = torch_linspace32(b0, b1, n)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch_linspace32(b0**0.5, b1**0.5, n) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    elif cfg["beta_schedule"] == "sigmoid":
        x = torch_linspace32(-6.0, 6.0, n)
        betas = (np.float32(1) / (np.float32(1) + np.exp(-x))) * np.float32(b1 - b0) + np.float32(b0)
    else:
        raise UserError(f"unsupported beta_schedule={cfg['beta_schedule']!r}")
    if cfg.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas.astype(np.float32)


def make_alphas_cumprod(cfg: dict) -> np.ndarray:
    return cumprod32(np.float32(1.0) - make_betas(cfg))


def spaced_timesteps(spacing: str, num_train: int, n: int, steps_offset: int = 0) -> np.ndarray:
    """DDPM/DDIM's set_timesteps: int64 timesteps, descending."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = num_train // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / n)).astype(np.int64) - 1
    raise UserError(f"unsupported timestep_spacing={spacing!r}")


# --------------------------------------------------------------------------------------------- sigmas


def sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of a sigma by log-linear interpolation (diffusers' _sigma_to_t, same dtypes)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras_sigmas(in_sigmas, n: int, sigma_min=None, sigma_max=None, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels between in_sigmas[-1] and in_sigmas[0] (or the config's bounds)."""
    sigma_min = sigma_min if sigma_min is not None else float(in_sigmas[-1])
    sigma_max = sigma_max if sigma_max is not None else float(in_sigmas[0])
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(in_sigmas, n: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    sigma_min = sigma_min if sigma_min is not None else float(in_sigmas[-1])
    sigma_max = sigma_max if sigma_max is not None else float(in_sigmas[0])
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


# ------------------------------------------------------------------------------------ training helpers


def _expand(v, x):
    v = jnp.ravel(v)
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def add_noise(alphas_cumprod, x0, noise, t):
    """sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise (DDPMScheduler.add_noise); t: timesteps [B] or scalar, integers
    (a plan's float32 timesteps hold integers and are rounded)."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        t = jnp.round(t).astype(jnp.int32)
    acp = jnp.asarray(alphas_cumprod, x0.dtype)[t]
    return _expand(acp**0.5, x0) * x0 + _expand((1 - acp) ** 0.5, x0) * noise


def velocity(alphas_cumprod, x0, noise, t):
    """v = sqrt(acp[t]) noise - sqrt(1 - acp[t]) x0 (DDPMScheduler.get_velocity)."""
    acp = jnp.asarray(alphas_cumprod, x0.dtype)[jnp.asarray(t)]
    return _expand(acp**0.5, x0) * noise - _expand((1 - acp) ** 0.5, x0) * x0


def f32(x):
    return jnp.asarray(np.asarray(x, np.float32))


def draw_noise(key, noise, like, what: str):
    """The step's Gaussian noise: `noise` when given, else drawn from `key`."""
    if noise is not None:
        return jnp.asarray(noise, like.dtype)
    if key is None:
        raise UserError(f"{what} needs a PRNG key (or noise=...) for its noise")
    return jax.random.normal(key, like.shape, like.dtype)


class Scheduler:
    """Base: a static, hashable-by-identity description; all arrays live in the plan (a pytree)."""

    name = ""
    defaults: dict = {}
    prediction_type = "epsilon"
    # Sigma-based schedulers (Euler, DPM): with zero terminal SNR, diffusers sets the last alpha_cumprod to
    # 2**-24 so sigma_max stays finite.
    clamp_terminal_alpha = False

    def __init__(self, config: dict | None = None):
        self.config = resolve_config(self.defaults, config)
        self.prediction_type = self.config.get("prediction_type", self.prediction_type)
        self.num_train_timesteps = int(self.config["num_train_timesteps"])
        self.validate()
        self.alphas_cumprod = make_alphas_cumprod(self.config) if "beta_schedule" in self.config else None
        if self.clamp_terminal_alpha and self.config.get("rescale_betas_zero_snr"):
            self.alphas_cumprod = self.alphas_cumprod.copy()
            self.alphas_cumprod[-1] = 2.0**-24

    def validate(self):
        check_common(self.config, self.name)

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"

    def num_model_calls(self, plan) -> int:
        return int(plan.timesteps.shape[0])

    def init_carry(self, plan, sample):
        return ()

    def scale_model_input(self, plan, sample, i):
        return sample

    def add_noise(self, plan, x0, noise, t):
        """Forward process at integer training timesteps t (the plan is not needed)."""
        return add_noise(self.alphas_cumprod, x0, noise, t)

    def velocity(self, x0, noise, t):
        return velocity(self.alphas_cumprod, x0, noise, t)

    def training_target(self, x0, noise, t):
        """What the model is trained to predict under this scheduler's prediction_type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        return x0

    def predict_x0_eps(self, model_output, sample, alpha_prod_t):
        """(x0, eps) from the model output as diffusers' DDIM computes them (float32, same operation order)."""
        beta_prod_t = 1 - alpha_prod_t
        if self.prediction_type == "epsilon":
            x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - alpha_prod_t**0.5 * x0) / beta_prod_t**0.5
        else:
            x0 = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
            eps = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        return x0, eps
