"""Adaptive teacher ODE solvers (diffrax Tsit5 / Dopri5) for the pair store, on an analytic teacher.

The teacher: data x0 ~ N(μ(prompt), s² I), so in the VE variable x = latents / α (σ = σ_t / α_t) the exact ε
prediction is ε̂ = σ (x − μ) / (s² + σ²), linear in x; with guidance, μ_g = μ_u + g (μ_c − μ_u). The probability-flow
ODE dx/dσ = ε̂ keeps (x − μ_g) / √(s² + σ²) constant, so the solver's end point, the x0 prediction at σ_min after
integrating from σ_max, is μ_g + c s² / √(s² + σ_min²), c = (x(σ_max) − μ_g) / √(s² + σ_max²): exact, closed form.
"""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_distill_sid import SCHED

from jaxdiff.distill import pairs as P
from jaxdiff.distill import teacher as teacher_lib
from jaxdiff.errors import UserError

SD = {**SCHED, "timestep_spacing": "linspace", "set_alpha_to_one": False}  # SD's scheduler config (test_distill_sid)
S = 0.5  # data standard deviation
GUIDANCE = 3.0


def _log_sigmas(config):
    acp = np.asarray(teacher_lib.Teacher(None, config).alphas_cumprod(), np.float64)
    return np.log(np.sqrt((1 - acp) / acp))


def _pipe(config=SD, calls=None):
    """A pipeline-shaped analytic teacher: μ is the context's first entry; the UNet's output under the config's
    prediction type. `calls`: a list that gets one entry per UNet call (the NFE, with B = 1)."""
    log_sigmas = jnp.asarray(_log_sigmas(config), jnp.float32)
    T = config["num_train_timesteps"]

    def apply(params, x, t, ctx):
        if calls is not None:
            jax.debug.callback(lambda: calls.append(1))
        sigma = jnp.exp(jnp.interp(t, jnp.arange(T, dtype=jnp.float32), log_sigmas))[:, None, None, None]
        alpha = 1 / jnp.sqrt(1 + sigma**2)
        mu = ctx[:, 0, 0][:, None, None, None]
        x_ve = x / alpha
        eps = sigma * (x_ve - mu) / (S**2 + sigma**2)
        if config["prediction_type"] == "epsilon":
            return eps
        return alpha * eps - sigma * alpha * (x_ve - sigma * eps)  # v = α ε − σ_t x0, x0 = x − σ ε (VE)

    unet = types.SimpleNamespace(apply=apply, params={})
    return types.SimpleNamespace(unet=unet, scheduler_config=dict(config))


def _inputs(b=4):
    rng = np.random.default_rng(0)
    z0 = rng.standard_normal((b, 2, 2, 1)).astype(np.float32)
    mu_c = rng.uniform(-1, 1, b).astype(np.float32)
    cond = np.broadcast_to(mu_c[:, None, None], (b, 1, 1)).copy()
    uncond = np.full((b, 1, 1), 0.2, np.float32)
    return jnp.asarray(z0), jnp.asarray(cond), jnp.asarray(uncond), mu_c


def _exact(z0, mu_c, mu_u=0.2, g=GUIDANCE, config=SD):
    sig = np.exp(_log_sigmas(config))
    s_max, s_min = sig[-1], sig[0]
    mu = (mu_u + g * (mu_c - mu_u))[:, None, None, None]
    c = (np.asarray(z0, np.float64) * np.sqrt(s_max**2 + 1) - mu) / np.sqrt(S**2 + s_max**2)
    return mu + c * S**2 / np.sqrt(S**2 + s_min**2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_tsit5_matches_the_closed_form_and_dpm_solver(prediction_type):
    pytest.importorskip("diffrax")
    config = dict(SD, prediction_type=prediction_type)
    pipe = _pipe(config)
    z0, cond, uncond, mu_c = _inputs()
    exact = _exact(z0, mu_c, config=config)
    tight = P.make_solver(pipe, "tsit5", 0, GUIDANCE, rtol=1e-6, atol=1e-6)
    z1, stats = tight.with_stats({}, z0, cond, uncond)
    # rtol = atol = 1e-6: the closed form to 5e-5 (a float32 solve; the values are ~1).
    np.testing.assert_allclose(z1, exact, atol=5e-5)
    # DPM-Solver++ 2M at 500 steps lands on the same point (its last step denoises at σ(t=1) instead of σ(t=0):
    # a difference of ~1e-3 here).
    dpm = np.asarray(P.make_solver(pipe, "dpm++2m", 500, GUIDANCE)({}, z0, cond, uncond))
    np.testing.assert_allclose(z1, dpm, atol=5e-3)
    # The default tolerance (1e-3): within 5e-3 of it and cheaper; NFE = 6 per step + 1 + the final x0 prediction.
    loose, s_loose = P.make_solver(pipe, "dopri5", 25, GUIDANCE).with_stats({}, z0, cond, uncond)
    np.testing.assert_allclose(loose, exact, atol=5e-3)
    for st in (stats, s_loose):
        np.testing.assert_array_equal(st["nfe"], 6 * np.asarray(st["num_steps"]) + 2)
    assert np.all(s_loose["nfe"] < stats["nfe"])


def test_nfe_counts_the_model_calls_and_no_guidance_runs_cond_only():
    pytest.importorskip("diffrax")
    calls = []
    z0, cond, uncond, mu_c = _inputs(1)
    solver = P.make_solver(_pipe(SD, calls), "tsit5", 0, 1.0)
    z1, stats = solver.with_stats({}, z0, cond, uncond)
    jax.block_until_ready(z1)
    assert len(calls) == int(stats["nfe"][0])
    np.testing.assert_allclose(z1, _exact(z0, mu_c, g=1.0), atol=1e-2)


def test_adaptive_pairs_in_the_store_report_their_nfe(tmp_path):
    pytest.importorskip("diffrax")
    contexts = np.linspace(-1, 1, 3, dtype=np.float32)[:, None, None]
    uncond = np.full((1, 1), 0.2, np.float32)
    solver = P.make_solver(_pipe(), "tsit5", 0, GUIDANCE)
    make = P.teacher_shard_fn(_pipe(), solver, contexts, uncond, 0, 2, (2, 2, 1))
    store = P.PairStore.open(tmp_path / "s", {"scheduler": "tsit5", "rtol": 1e-3, "atol": 1e-3}, 2, ["a", "b", "c"])
    store.fill(4, make)
    pairs = store.load(4)
    assert pairs["nfe"].shape == (4,) and pairs["z1"].shape == (4, 2, 2, 1)
    summary = P.solver_summary(pairs)
    assert summary["nfe_min"] >= 8 and summary["nfe_mean"] == pytest.approx(pairs["nfe"].mean())
    assert P.solver_summary({"z1": pairs["z1"]}) == {}


def test_missing_diffrax_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffrax", None)  # `import diffrax` raises ImportError
    with pytest.raises(UserError, match="need diffrax.*optional"):
        P.make_solver(_pipe(), "tsit5", 0, GUIDANCE)
    P.make_solver(_pipe(), "ddim", 2, GUIDANCE)  # the fixed-step schedulers are unaffected


def test_solver_settings_join_the_key_only_for_adaptive_solvers():
    from jaxdiff.config import load_config

    fixed = load_config("configs/distill/reflow.py:shapes").pairs
    assert P.solver_settings(fixed) == {}  # fixed-step stores keep their keys
    adaptive = load_config("configs/distill/instaflow.py:shapes,tsit5").pairs
    assert adaptive.scheduler == "tsit5"
    assert P.solver_settings(adaptive) == {"rtol": 1e-3, "atol": 1e-3}
    adaptive.rtol = 1e-5
    assert P.solver_settings(adaptive)["rtol"] == 1e-5


def test_flow_teacher_integrates_sigma_from_one_to_zero():
    """A FlowMatch teacher on the same Gaussian data: x_σ = (1 − σ) x0 + σ ε, the exact velocity u = E[ε − x0 | x]
    is linear in x and μ, and the ODE from x(1) = z0 ends at μ_g + s z0."""
    pytest.importorskip("diffrax")
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

    def apply(params, x, t, ctx):
        sigma = (t / 1000.0)[:, None, None, None]
        mu = ctx[:, 0, 0][:, None, None, None]
        var = (1 - sigma) ** 2 * S**2 + sigma**2
        return -mu + (x - (1 - sigma) * mu) * (sigma - (1 - sigma) * S**2) / var

    pipe = types.SimpleNamespace(unet=types.SimpleNamespace(apply=apply, params={}), scheduler_config=config)
    z0, cond, uncond, mu_c = _inputs()
    z1, stats = P.make_solver(pipe, "tsit5", 0, GUIDANCE, rtol=1e-6, atol=1e-6).with_stats({}, z0, cond, uncond)
    mu_g = (0.2 + GUIDANCE * (mu_c - 0.2))[:, None, None, None]
    np.testing.assert_allclose(z1, mu_g + S * np.asarray(z0), atol=5e-5)
    np.testing.assert_array_equal(stats["nfe"], 6 * np.asarray(stats["num_steps"]) + 1)  # no x0 step for flows
