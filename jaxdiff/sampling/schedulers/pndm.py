"""PNDM (Runge-Kutta warm-up, then linear multistep) as a table-driven pure step, as diffusers' PNDMScheduler."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.sampling.schedulers.common import Scheduler, check_common, check_steps, f32

# linear multistep weights on (e_new, e_-1, e_-2, e_-3) by the length of diffusers' `ets` list after the append
_PLMS = {
    2: (3 / 2, -1 / 2, 0.0, 0.0),
    3: (23 / 12, -16 / 12, 5 / 12, 0.0),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
_FIELDS = ("w_e", "w_h0", "w_h1", "w_h2", "w_acc", "acc_keep", "acc_e", "push", "set_cur", "base_cur")


@flax.struct.dataclass
class PNDMPlan:
    timesteps: jax.Array  # [M] float32 (M = N + 1 with skip_prk_steps, else N + 9)
    init_noise_sigma: jax.Array
    table: jax.Array  # [M, 10] the step's control flow, columns _FIELDS
    sample_coeff: jax.Array  # [M] sqrt(a_prev / a_t)
    eps_coeff: jax.Array  # [M] (a_prev - a_t) / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev))
    sqrt_a: jax.Array  # [M] sqrt(a_t), sqrt(1 - a_t) for v_prediction
    sqrt_b: jax.Array


class PNDM(Scheduler):
    """diffusers' stateful counter / `ets` list / cur_sample logic is simulated on the host into a per-step table
    of weights; the carry is (the last three pushed model outputs, the Runge-Kutta accumulator, cur_sample)."""

    name = "pndm"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        skip_prk_steps=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=0,
    )

    def validate(self):
        check_common(self.config, self.name, predictions=("epsilon", "v_prediction"))

    def _base_timesteps(self, n: int) -> np.ndarray:
        c, T = self.config, self.num_train_timesteps
        if c["timestep_spacing"] == "linspace":
            return np.linspace(0, T - 1, n).round().astype(np.int64)
        if c["timestep_spacing"] == "leading":
            return (np.arange(0, n) * (T // n)).round() + c["steps_offset"]
        return np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1

    def plan(self, num_inference_steps: int) -> PNDMPlan:
        c, T = self.config, self.num_train_timesteps
        n = check_steps(num_inference_steps, T, limit=False)
        base = self._base_timesteps(n)
        ratio = T // n
        if c["skip_prk_steps"]:
            prk = np.array([], np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            if n < 4:
                raise UserError("pndm: PRK warm-up needs num_inference_steps >= 4 (or skip_prk_steps=True)")
            prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
            prk = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
            plms = base[:-3][::-1].copy()
        ts = np.concatenate([prk, plms]).astype(np.int64)
        acp = self.alphas_cumprod
        final = np.float32(1.0) if c["set_alpha_to_one"] else acp[0]
        rows, t_eff, t_prev = [], [], []
        n_ets = 0
        for k, t in enumerate(ts):
            r = dict.fromkeys(_FIELDS, 0.0)
            r["acc_keep"] = 1.0
            if k < len(prk):  # step_prk
                t_prev.append(t - (0 if k % 2 else ratio // 2))
                t_eff.append(prk[k // 4 * 4])
                r["base_cur"] = 1.0
                if k % 4 == 0:
                    r.update(w_e=1.0, acc_e=1 / 6, push=1.0, set_cur=1.0)
                    n_ets += 1
                elif k % 4 in (1, 2):
                    r.update(w_e=1.0, acc_e=1 / 3)
                else:
                    r.update(w_e=1 / 6, w_acc=1.0, acc_keep=0.0)
            else:  # step_plms
                if k != 1:
                    t_prev.append(t - ratio)
                    t_eff.append(t)
                    r["push"] = 1.0
                    n_ets = min(n_ets, 3) + 1
                else:
                    t_prev.append(t)
                    t_eff.append(t + ratio)
                if n_ets == 1 and k == 0:
                    r.update(w_e=1.0, set_cur=1.0)
                elif n_ets == 1 and k == 1:
                    r.update(w_e=0.5, w_h0=0.5, base_cur=1.0)
                else:
                    r.update(zip(("w_e", "w_h0", "w_h1", "w_h2"), _PLMS[n_ets]))
            rows.append([r[f] for f in _FIELDS])
        t_eff, t_prev = np.array(t_eff), np.array(t_prev)
        a_t = acp[t_eff].astype(np.float64)
        a_p = np.where(t_prev >= 0, acp[np.maximum(t_prev, 0)], final).astype(np.float64)
        denom = a_t * (1 - a_p) ** 0.5 + (a_t * (1 - a_t) * a_p) ** 0.5
        return PNDMPlan(
            timesteps=f32(ts),
            init_noise_sigma=f32(1.0),
            table=f32(rows),
            sample_coeff=f32((a_p / a_t) ** 0.5),
            eps_coeff=f32((a_p - a_t) / denom),
            sqrt_a=f32(a_t**0.5),
            sqrt_b=f32((1 - a_t) ** 0.5),
        )

    def init_carry(self, plan, sample):
        z = jnp.zeros_like(sample)
        return {"ets": (z, z, z), "acc": z, "cur": z}

    def step(self, plan: PNDMPlan, model_output, i, sample, carry, key=None):
        w_e, w_h0, w_h1, w_h2, w_acc, acc_keep, acc_e, push, set_cur, base_cur = (plan.table[i, j] for j in range(10))
        h0, h1, h2 = carry["ets"]
        cur = jnp.where(set_cur > 0, sample, carry["cur"])
        x = jnp.where(base_cur > 0, cur, sample)
        e = model_output
        m = w_e * e + w_h0 * h0 + w_h1 * h1 + w_h2 * h2 + w_acc * carry["acc"]
        if self.prediction_type == "v_prediction":
            m = plan.sqrt_a[i] * m + plan.sqrt_b[i] * x
        prev = plan.sample_coeff[i] * x - plan.eps_coeff[i] * m
        pushed = push > 0
        e = e.astype(h0.dtype)
        ets = (jnp.where(pushed, e, h0), jnp.where(pushed, h0, h1), jnp.where(pushed, h1, h2))
        acc = (acc_keep * carry["acc"] + acc_e * e).astype(h0.dtype)
        return prev.astype(sample.dtype), {"ets": ets, "acc": acc, "cur": cur.astype(h0.dtype)}
