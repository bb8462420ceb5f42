"""Euler discrete (optional Karras / exponential sigmas), matching diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.sampling.schedulers.common import (
    Scheduler,
    check,
    check_steps,
    exponential_sigmas,
    f32,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
)


@flax.struct.dataclass
class EulerPlan:
    timesteps: jax.Array  # [N] float32 (fractional with linspace spacing or Karras sigmas)
    init_noise_sigma: jax.Array
    sigmas: jax.Array  # [N + 1], last = 0 (or sigma_min)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sqrt((1 - acp) / acp) in float32, ascending with the training timestep."""
    return np.sqrt((np.float32(1) - alphas_cumprod) / alphas_cumprod)


class EulerDiscrete(Scheduler):
    """Deterministic Euler (s_churn = 0, diffusers' default). The model sees x / sqrt(sigma^2 + 1)."""

    name = "euler"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        sigma_min=None,
        sigma_max=None,
        timestep_spacing="linspace",
        timestep_type="discrete",
        steps_offset=0,
        rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
    )

    clamp_terminal_alpha = True

    def validate(self):
        super().validate()
        c, n = self.config, self.name
        check(c, "interpolation_type", ("linear",), n)
        check(c, "use_beta_sigmas", (False, None), n)
        check(c, "timestep_type", ("discrete", "continuous"), n)
        check(c, "final_sigmas_type", ("zero", "sigma_min"), n)
        if c["use_karras_sigmas"] and c["use_exponential_sigmas"]:
            raise UserError(f"{n}: use_karras_sigmas and use_exponential_sigmas are exclusive")

    def plan(self, num_inference_steps: int) -> EulerPlan:
        c, T = self.config, self.num_train_timesteps
        n = check_steps(num_inference_steps, T, limit=False)
        if c["timestep_spacing"] == "linspace":
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        elif c["timestep_spacing"] == "leading":
            ts = spaced_timesteps("leading", T, n, 0).astype(np.float32) + np.float32(c["steps_offset"])
        else:
            ts = (np.arange(T, 0, -T / n)).round().astype(np.float32) - np.float32(1)
        acp = self.alphas_cumprod
        sig = train_sigmas(acp)
        log_sigmas = np.log(sig)
        sigmas = np.interp(ts, np.arange(0, len(sig)), sig)
        if c["use_karras_sigmas"] or c["use_exponential_sigmas"]:
            convert = karras_sigmas if c["use_karras_sigmas"] else exponential_sigmas
            sigmas = convert(sigmas, n, c["sigma_min"], c["sigma_max"])
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        last = np.sqrt((np.float32(1) - acp[0]) / acp[0]) if c["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        if c["timestep_type"] == "continuous" and self.prediction_type == "v_prediction":
            ts = np.float32(0.25) * np.log(sigmas[:-1])
        smax = sigmas.max()
        init = smax if c["timestep_spacing"] in ("linspace", "trailing") else (smax**2 + np.float32(1)) ** 0.5
        return EulerPlan(timesteps=f32(ts), init_noise_sigma=f32(init), sigmas=f32(sigmas))

    def scale_model_input(self, plan: EulerPlan, sample, i):
        sigma = plan.sigmas[i]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, plan: EulerPlan, model_output, i, sample, carry=(), key=None):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        if self.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        elif self.prediction_type == "v_prediction":
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        else:
            x0 = model_output
        derivative = (sample - x0) / sigma
        return (sample + derivative * (sigma_next - sigma)).astype(sample.dtype), carry

    def add_noise(self, plan, x0, noise, t):
        """plan None: the variance-preserving forward process at integer t (training). With a plan: diffusers'
        Euler add_noise, x0 + sigma * noise at the plan step whose timestep equals t (img2img)."""
        if plan is None:
            return super().add_noise(plan, x0, noise, t)
        t = jnp.ravel(jnp.asarray(t, jnp.float32))
        idx = jnp.argmax(plan.timesteps[None, :] == t[:, None], axis=1)
        sigma = plan.sigmas[idx].reshape((-1,) + (1,) * (x0.ndim - 1))
        return x0 + noise * sigma
