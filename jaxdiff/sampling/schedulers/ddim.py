"""DDIM (deterministic at eta=0) as a pure step function, matching diffusers' DDIMScheduler."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.sampling.schedulers.common import Scheduler, check_steps, draw_noise, f32, spaced_timesteps


@flax.struct.dataclass
class DDIMPlan:
    timesteps: jax.Array  # [N] float32
    init_noise_sigma: jax.Array
    alpha_prod_t: jax.Array  # [N]
    alpha_prod_t_prev: jax.Array  # [N] at t - num_train_timesteps // N (final_alpha_cumprod below 0)


class DDIM(Scheduler):
    """DDIM. eta: `make_scheduler("ddim", cfg, eta=...)` (or an "eta" key in the config dict) sets the default,
    step(..., eta=...) overrides it per call (may be traced). With eta > 0 the noise comes from `key`, or from
    noise=... (diffusers' variance_noise). Quirk kept: the previous timestep is always t - T // N, whatever the
    spacing (diffusers does so for trailing and linspace too)."""

    name = "ddim"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        clip_sample_range=1.0,
        sample_max_value=1.0,
        timestep_spacing="leading",
        rescale_betas_zero_snr=False,
    )

    def __init__(self, config=None, eta: float | None = None):
        super().__init__(config)
        self.eta = float(eta if eta is not None else (config or {}).get("eta", 0.0))
        if self.eta < 0:
            raise UserError(f"ddim: eta must be >= 0, got {self.eta}")

    def plan(self, num_inference_steps: int) -> DDIMPlan:
        c = self.config
        n = check_steps(num_inference_steps, self.num_train_timesteps)
        ts = spaced_timesteps(c["timestep_spacing"], self.num_train_timesteps, n, c["steps_offset"])
        acp = self.alphas_cumprod
        final = np.float32(1.0) if c["set_alpha_to_one"] else acp[0]
        prev = ts - self.num_train_timesteps // n
        a_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], final)
        return DDIMPlan(f32(ts), f32(1.0), f32(acp[ts]), f32(a_prev))

    def step(self, plan: DDIMPlan, model_output, i, sample, carry=(), key=None, *, eta=None, noise=None):
        c = self.config
        eta = self.eta if eta is None else eta
        a_t, a_prev = plan.alpha_prod_t[i], plan.alpha_prod_t_prev[i]
        x0, eps = self.predict_x0_eps(model_output, sample, a_t)
        if c["clip_sample"]:
            x0 = jnp.clip(x0, -c["clip_sample_range"], c["clip_sample_range"])
        variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
        std = eta * variance**0.5
        direction = (1 - a_prev - std**2) ** 0.5 * eps
        prev = a_prev**0.5 * x0 + direction
        if isinstance(eta, (int, float)) and eta == 0:
            return prev.astype(sample.dtype), carry
        prev = prev + std * draw_noise(key, noise, sample, "DDIM with eta > 0")
        return prev.astype(sample.dtype), carry
