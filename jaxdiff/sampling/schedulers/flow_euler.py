"""Euler for rectified-flow models, x + (sigma_next - sigma) v, as diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.sampling.schedulers.common import Scheduler, check, check_steps, exponential_sigmas, f32, karras_sigmas


@flax.struct.dataclass
class FlowPlan:
    timesteps: jax.Array  # [N] float32, sigma * num_train_timesteps
    init_noise_sigma: jax.Array  # 1
    sigmas: jax.Array  # [N + 1], last = 0


class FlowEuler(Scheduler):
    """Static shift only (no dynamic shifting / mu). Convention: x_sigma = (1 - sigma) x0 + sigma noise, the model
    predicts v = noise - x0; sigma = 1 is pure noise."""

    name = "flow_euler"
    prediction_type = "flow_prediction"
    defaults = dict(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=False,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        invert_sigmas=False,
        shift_terminal=None,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        time_shift_type="exponential",
        stochastic_sampling=False,
    )

    def __init__(self, config=None):
        super().__init__(config)
        T, shift = self.num_train_timesteps, self.config["shift"]
        ts = np.linspace(1, T, T, dtype=np.float32)[::-1].copy()
        s = ts / np.float32(T)
        s = np.float32(shift) * s / (np.float32(1) + np.float32(shift - 1) * s)
        self.train_sigmas = s.astype(np.float32)
        self.sigma_min, self.sigma_max = float(s[-1]), float(s[0])

    def validate(self):
        c, n = self.config, self.name
        for key in ("use_dynamic_shifting", "invert_sigmas", "use_beta_sigmas", "stochastic_sampling"):
            check(c, key, (False, None), n)
        if c["shift"] <= 0:
            raise UserError(f"{n}: shift must be > 0, got {c['shift']!r}")
        if c["use_karras_sigmas"] and c["use_exponential_sigmas"]:
            raise UserError(f"{n}: use_karras_sigmas and use_exponential_sigmas are exclusive")

    def plan(self, num_inference_steps: int) -> FlowPlan:
        c, T = self.config, self.num_train_timesteps
        n = check_steps(num_inference_steps, T, limit=False)
        ts = np.linspace(self.sigma_max * T, self.sigma_min * T, n)
        s = ts / T
        s = c["shift"] * s / (1 + (c["shift"] - 1) * s)
        if c["shift_terminal"]:
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - c["shift_terminal"]))
        if c["use_karras_sigmas"]:
            s = karras_sigmas(s, n)
        elif c["use_exponential_sigmas"]:
            s = exponential_sigmas(s, n)
        s32 = s.astype(np.float32)
        return FlowPlan(
            timesteps=f32(s32 * np.float32(T)),
            init_noise_sigma=f32(1.0),
            sigmas=f32(np.concatenate([s32, np.zeros(1, np.float32)])),
        )

    def step(self, plan: FlowPlan, model_output, i, sample, carry=(), key=None):
        dt = plan.sigmas[i + 1] - plan.sigmas[i]
        return (sample + dt * model_output).astype(sample.dtype), carry

    def add_noise(self, plan, x0, noise, t):
        """(1 - sigma) x0 + sigma noise with sigma = t / num_train_timesteps (t: float timesteps [B] or scalar)."""
        sigma = jnp.ravel(jnp.asarray(t, x0.dtype)) / self.num_train_timesteps
        sigma = sigma.reshape(sigma.shape + (1,) * (x0.ndim - 1))
        return sigma * noise + (1.0 - sigma) * x0

    def velocity(self, x0, noise, t=None):
        return noise - x0

    def training_target(self, x0, noise, t=None):
        return noise - x0
