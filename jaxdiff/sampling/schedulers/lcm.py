"""Latent Consistency Model multistep sampling as a pure step function, matching diffusers' LCMScheduler."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.sampling.schedulers.common import Scheduler, check_common, check_steps, draw_noise, f32

SIGMA_DATA = 0.5  # the consistency-model boundary condition's sigma_data (fixed in diffusers)


@flax.struct.dataclass
class LCMPlan:
    timesteps: jax.Array  # [N] float32
    init_noise_sigma: jax.Array  # scalar
    alpha_prod_t: jax.Array  # [N]
    alpha_prod_t_prev: jax.Array  # [N] ᾱ at the next timestep of the plan; 1 at the last step (no re-noising)
    c_skip: jax.Array  # [N] boundary-condition scalings at timestep * timestep_scaling
    c_out: jax.Array  # [N]


def lcm_timesteps(num_train: int, original_steps: int, n: int) -> np.ndarray:
    """diffusers' LCMScheduler.set_timesteps (strength 1): `n` of the `original_steps` distillation timesteps
    k-1, 2k-1, ..., original_steps*k - 1 (k = num_train // original_steps), evenly spaced in index from the
    noisiest; int64, descending."""
    k = num_train // original_steps
    origin = (np.arange(1, original_steps + 1, dtype=np.int64) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, original_steps, num=n, endpoint=False)).astype(np.int64)
    return origin[idx].copy()


class LCM(Scheduler):
    """Consistency sampling: at each step the boundary-conditioned x0 estimate
    denoised = c_out * x0(model_output) + c_skip * sample, then, before every step but the last,
    x_prev = sqrt(ᾱ_prev) denoised + sqrt(1 - ᾱ_prev) z with fresh noise z (ᾱ_prev at the plan's next timestep);
    the last step returns `denoised`.

    step(..., key) draws z from `key`; pass noise=z to inject it instead (e.g. for parity tests). Without key and
    noise only a concrete last step (or a 1-step plan) runs. Timesteps come from `original_inference_steps`
    (diffusers ignores timestep_spacing and steps_offset here, and so does this); `set_alpha_to_one` is accepted
    and, as in diffusers, never changes the result (the last step adds no noise)."""

    name = "lcm"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        trained_betas=None,
        original_inference_steps=50,
        clip_sample=False,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
        timestep_spacing="leading",
        timestep_scaling=10.0,
        rescale_betas_zero_snr=False,
    )

    def validate(self):
        c = self.config
        # timestep_spacing is not read by LCM (diffusers ignores it), so any value passes
        check_common({k: v for k, v in c.items() if k != "timestep_spacing"}, self.name)
        orig = c["original_inference_steps"]
        if isinstance(orig, bool) or not isinstance(orig, (int, np.integer)) or orig < 1:
            raise UserError(f"lcm: original_inference_steps must be a positive integer, got {orig!r}")
        if orig > self.num_train_timesteps:
            raise UserError(
                f"lcm: original_inference_steps={orig} cannot be larger than "
                f"num_train_timesteps={self.num_train_timesteps}"
            )

    def plan(self, num_inference_steps: int) -> LCMPlan:
        c = self.config
        n = check_steps(num_inference_steps, self.num_train_timesteps)
        orig = int(c["original_inference_steps"])
        if n > orig:
            raise UserError(
                f"num_inference_steps={n} cannot be larger than original_inference_steps={orig} (LCM's timesteps "
                "are a subset of the original_inference_steps schedule)"
            )
        ts = lcm_timesteps(self.num_train_timesteps, orig, n)
        acp = self.alphas_cumprod
        a_prev = np.concatenate([acp[ts[1:]], [np.float32(1.0)]]).astype(np.float32)
        # float32 as diffusers computes them from the int64 timestep tensor
        scaled = ts.astype(np.float32) * np.float32(c["timestep_scaling"])
        denom = scaled**2 + np.float32(SIGMA_DATA**2)
        c_skip = np.float32(SIGMA_DATA**2) / denom
        c_out = scaled / denom ** np.float32(0.5)
        return LCMPlan(
            timesteps=f32(ts),
            init_noise_sigma=f32(1.0),
            alpha_prod_t=f32(acp[ts]),
            alpha_prod_t_prev=f32(a_prev),
            c_skip=f32(c_skip),
            c_out=f32(c_out),
        )

    def denoised(self, plan: LCMPlan, model_output, i, sample):
        """The step's consistency-model output (diffusers' LCMSchedulerOutput.denoised)."""
        c = self.config
        x0, _ = self.predict_x0_eps(model_output, sample, plan.alpha_prod_t[i])
        if c["clip_sample"]:
            x0 = jnp.clip(x0, -c["clip_sample_range"], c["clip_sample_range"])
        return plan.c_out[i] * x0 + plan.c_skip[i] * sample

    def step(self, plan: LCMPlan, model_output, i, sample, carry=(), key=None, *, noise=None):
        denoised = self.denoised(plan, model_output, i, sample)
        last = plan.timesteps.shape[0] - 1
        concrete_last = isinstance(i, (int, np.integer)) and int(i) in (last, -1)
        if key is None and noise is None and (last == 0 or concrete_last):
            return denoised.astype(sample.dtype), carry
        z = draw_noise(key, noise, denoised, "LCM (before every step but the last)")
        # At the last step ᾱ_prev = 1: 1 * denoised + 0 * z, i.e. denoised exactly.
        a_prev = plan.alpha_prod_t_prev[i]
        prev = a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * z
        return prev.astype(sample.dtype), carry
