"""DDPM ancestral sampling as a pure step function, matching diffusers' DDPMScheduler."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.sampling.schedulers.common import Scheduler, check, check_steps, draw_noise, f32, spaced_timesteps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@flax.struct.dataclass
class DDPMPlan:
    timesteps: jax.Array  # [N] float32
    init_noise_sigma: jax.Array  # scalar
    alpha_prod_t: jax.Array  # [N]
    alpha_prod_t_prev: jax.Array  # [N]
    noise_std: jax.Array  # [N] factor of the unit noise (0 at t == 0)


class DDPM(Scheduler):
    """x_{t_prev} = posterior mean + std * z, with t_prev the next timestep of the plan (diffusers' previous_timestep).

    step(..., key) draws z from `key`; pass noise=z to inject it instead (e.g. for parity tests)."""

    name = "ddpm"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        variance_type="fixed_small",
        clip_sample=True,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        clip_sample_range=1.0,
        sample_max_value=1.0,
        timestep_spacing="leading",
        steps_offset=0,
        rescale_betas_zero_snr=False,
    )

    def validate(self):
        super().validate()
        check(self.config, "variance_type", VARIANCE_TYPES, self.name)

    def plan(self, num_inference_steps: int) -> DDPMPlan:
        c = self.config
        n = check_steps(num_inference_steps, self.num_train_timesteps)
        ts = spaced_timesteps(c["timestep_spacing"], self.num_train_timesteps, n, c["steps_offset"])
        acp = self.alphas_cumprod
        prev = np.concatenate([ts[1:], [-1]])
        a_t = acp[ts]
        a_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], np.float32(1.0)).astype(np.float32)
        cur_beta = np.float32(1) - a_t / a_prev
        var = np.maximum((np.float32(1) - a_prev) / (np.float32(1) - a_t) * cur_beta, np.float32(1e-20))
        vt = c["variance_type"]
        std = np.sqrt(var) if vt in ("fixed_small", "fixed_small_log") else np.sqrt(cur_beta)
        std = np.where(ts > 0, std, 0.0)
        return DDPMPlan(
            timesteps=f32(ts),
            init_noise_sigma=f32(1.0),
            alpha_prod_t=f32(a_t),
            alpha_prod_t_prev=f32(a_prev),
            noise_std=f32(std),
        )

    def step(self, plan: DDPMPlan, model_output, i, sample, carry=(), key=None, *, noise=None):
        c = self.config
        a_t, a_prev = plan.alpha_prod_t[i], plan.alpha_prod_t_prev[i]
        beta_t, beta_prev = 1 - a_t, 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        x0, _ = self.predict_x0_eps(model_output, sample, a_t)
        if c["clip_sample"]:
            x0 = jnp.clip(x0, -c["clip_sample_range"], c["clip_sample_range"])
        x0_coeff = (a_prev**0.5 * cur_beta) / beta_t
        x_coeff = cur_alpha**0.5 * beta_prev / beta_t
        prev = x0_coeff * x0 + x_coeff * sample
        z = draw_noise(key, noise, sample, "DDPM")
        return (prev + plan.noise_std[i] * z).astype(sample.dtype), carry
