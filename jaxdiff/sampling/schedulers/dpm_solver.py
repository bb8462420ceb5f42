"""DPM-Solver++ 2M (multistep, data prediction) as a pure step, matching diffusers' DPMSolverMultistepScheduler."""

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
)


@flax.struct.dataclass
class DPMPlan:
    timesteps: jax.Array  # [N] float32 (integer values, as diffusers' int64 timesteps)
    init_noise_sigma: jax.Array
    sigmas: jax.Array  # [N + 1]
    alpha: jax.Array  # [N] alpha_t of step i (for x0 = (x - sigma_t eps) / alpha_t)
    sigma: jax.Array  # [N] sigma_t of step i
    c_x: jax.Array  # [N] x_next = c_x x + c_d0 D0 + c_d1 D1, D1 = inv_r0 (x0 - x0_prev)
    c_d0: jax.Array
    c_d1: jax.Array
    inv_r0: jax.Array  # 0 on first-order steps


class DPMSolverPP(Scheduler):
    """Multistep DPM-Solver++ of order 1 or 2 (midpoint or heun). Per-step coefficients are computed on the host
    in float64 from diffusers' float32 sigmas; the order of each step follows diffusers (first order at step 0,
    and at the last step when lower_order_final with N < 15, euler_at_final, or final_sigmas_type == "zero").
    The carry is the previous step's x0 prediction."""

    name = "dpm++2m"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        solver_order=2,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        flow_shift=1.0,
        final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"),
        variance_type=None,
        timestep_spacing="linspace",
        steps_offset=0,
        rescale_betas_zero_snr=False,
        use_dynamic_shifting=False,
        time_shift_type="exponential",
    )

    clamp_terminal_alpha = True

    def validate(self):
        super().validate()
        c, n = self.config, self.name
        check(c, "algorithm_type", ("dpmsolver++", "deis"), n)
        check(c, "solver_order", (1, 2), n)
        check(c, "solver_type", ("midpoint", "heun", "logrho", "bh1", "bh2"), n)
        check(c, "final_sigmas_type", ("zero", "sigma_min"), n)
        check(c, "variance_type", (None,), n)
        for key in ("use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"):
            check(c, key, (False, None), n)
        if sum(bool(c[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas")) > 1:
            raise UserError(f"{n}: use_karras_sigmas, use_exponential_sigmas and use_lu_lambdas are exclusive")

    def _timesteps_sigmas(self, n: int):
        c, T, acp = self.config, self.num_train_timesteps, self.alphas_cumprod
        lambda_t = np.log(np.sqrt(acp)) - np.log(np.sqrt(np.float32(1) - acp))
        last = T - int(np.searchsorted(np.flip(lambda_t), c["lambda_min_clipped"]))
        if c["timestep_spacing"] == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif c["timestep_spacing"] == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + c["steps_offset"]
        else:
            ts = np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1
        sigmas = np.sqrt((np.float32(1) - acp) / acp)
        log_sigmas = np.log(sigmas)
        if c["use_karras_sigmas"] or c["use_exponential_sigmas"]:
            convert = karras_sigmas if c["use_karras_sigmas"] else exponential_sigmas
            sigmas = convert(np.flip(sigmas).copy(), n, c.get("sigma_min"), c.get("sigma_max"))
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if c["use_karras_sigmas"] and c["beta_schedule"] != "squaredcos_cap_v2":
                ts = ts.round()
        elif c["use_lu_lambdas"]:
            lambdas = np.flip(log_sigmas.copy())
            lmin, lmax = float(lambdas[-1]), float(lambdas[0])
            sigmas = np.exp(lmax + np.linspace(0, 1, n) * (lmin - lmax))
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if c["beta_schedule"] != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
        last_sigma = np.sqrt((np.float32(1) - acp[0]) / acp[0]) if c["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)
        return ts.astype(np.int64), sigmas

    def plan(self, num_inference_steps: int) -> DPMPlan:
        c = self.config
        ts, sig32 = self._timesteps_sigmas(check_steps(num_inference_steps, self.num_train_timesteps, limit=False))
        n = len(ts)
        alpha32 = np.float32(1) / (sig32 * sig32 + np.float32(1)) ** np.float32(0.5)
        s = sig32.astype(np.float64)
        alpha = 1 / np.sqrt(s**2 + 1)
        sigma = s * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)
        cx, cd0, cd1, inv_r0 = (np.zeros(n) for _ in range(4))
        for i in range(n):
            final = i == n - 1 and (
                c["euler_at_final"] or (c["lower_order_final"] and n < 15) or c["final_sigmas_type"] == "zero"
            )
            h = lam[i + 1] - lam[i]
            with np.errstate(divide="ignore", invalid="ignore"):
                cx[i] = sigma[i + 1] / sigma[i]
            em1 = np.exp(-h) - 1.0
            cd0[i] = -(alpha[i + 1] * em1)
            if not (c["solver_order"] == 1 or i == 0 or final):
                inv_r0[i] = h / (lam[i] - lam[i - 1])
                if c["solver_type"] == "heun":
                    cd1[i] = alpha[i + 1] * (em1 / h + 1.0)
                else:
                    cd1[i] = -0.5 * (alpha[i + 1] * em1)
        return DPMPlan(
            timesteps=f32(ts),
            init_noise_sigma=f32(1.0),
            sigmas=f32(sig32),
            alpha=f32(alpha32[:n]),
            sigma=f32(sig32[:n] * alpha32[:n]),
            c_x=f32(cx),
            c_d0=f32(cd0),
            c_d1=f32(cd1),
            inv_r0=f32(inv_r0),
        )

    def init_carry(self, plan, sample):
        return jnp.zeros_like(sample)

    def step(self, plan: DPMPlan, model_output, i, sample, carry, key=None):
        alpha, sigma = plan.alpha[i], plan.sigma[i]
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma * model_output) / alpha
        elif self.prediction_type == "v_prediction":
            x0 = alpha * sample - sigma * model_output
        else:
            x0 = model_output
        d1 = plan.inv_r0[i] * (x0 - carry)
        prev = plan.c_x[i] * sample + plan.c_d0[i] * x0 + plan.c_d1[i] * d1
        return prev.astype(sample.dtype), x0.astype(carry.dtype)
