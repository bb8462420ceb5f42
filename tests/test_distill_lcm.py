"""LCM: boundary scalings, the skipping-step DDIM solver, the loss vs numpy transcriptions; the command's smoke run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_distill_sid

from jaxdiff import cli
from jaxdiff.config import load_config
from jaxdiff.distill import lcm

RTOL = 1e-5  # float32 vs float64 numpy transcriptions
SCHED, ACP = test_distill_sid.SCHED, test_distill_sid.ACP  # SD's scaled-linear DDIM config and its ᾱ (float64)
tiny_teacher = test_distill_sid.tiny_teacher  # the fixture: a tiny random UNet in the shapes pipeline


def _rand(seed, shape=(3, 4, 4, 2)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_boundary_scalings_match_the_formula():
    t = np.array([0.0, 1.0, 19.0, 500.0, 999.0])
    c_skip, c_out = lcm.scalings_for_boundary_conditions(jnp.asarray(t, jnp.float32), 0.5, 10.0)
    s = 10.0 * t
    np.testing.assert_allclose(c_skip, 0.25 / (s**2 + 0.25), rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(c_out, s / np.sqrt(s**2 + 0.25), rtol=RTOL)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0  # f(x, 0) = x


def test_ddim_solver_matches_a_transcription():
    taus, prev, k = lcm.ddim_solver(ACP, 1000, 50)
    assert k == 20 and taus[0] == 19 and taus[-1] == 999 and len(taus) == 50
    np.testing.assert_array_equal(taus, np.arange(19, 1000, 20))
    want_prev = np.array([ACP[0]] + [ACP[t] for t in taus[:-1]])
    np.testing.assert_array_equal(prev, want_prev)
    # ᾱ_prev is ᾱ at max(start − k, 0): the jump lands on the target's timestep.
    np.testing.assert_array_equal(prev, ACP[np.maximum(taus - k, 0)])
    x0, eps, idx = _rand(0), _rand(1), np.array([0, 17, 49])
    got = lcm.ddim_step(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(prev[idx], jnp.float32))
    a = prev[idx][:, None, None, None]
    np.testing.assert_allclose(got, np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["huber", "l2"])
def test_loss_matches_a_transcription(loss_type):
    x, x0, t = _rand(2), _rand(3), np.array([0.0, 19.0, 980.0])
    c_skip, c_out = lcm.scalings_for_boundary_conditions(t)
    pred = np.asarray(
        lcm.consistency_output(
            jnp.asarray(x), jnp.asarray(x0), jnp.asarray(c_skip, jnp.float32), jnp.asarray(c_out, jnp.float32)
        )
    )
    want_pred = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * x0.astype(np.float64)
    np.testing.assert_allclose(pred, want_pred, rtol=RTOL, atol=1e-6)
    target = _rand(4)
    got = float(lcm.consistency_loss(jnp.asarray(pred), jnp.asarray(target), loss_type, 0.001))
    d = pred.astype(np.float64) - target
    want = np.mean(np.sqrt(d**2 + 1e-6) - 1e-3) if loss_type == "huber" else np.mean(d**2)
    np.testing.assert_allclose(got, want, rtol=RTOL)


def _toy_unet(params, x, t, ctx):
    c = jnp.tanh(jnp.mean(ctx, axis=(1, 2)))[:, None, None, None]
    return x * params["w"] + params["b"] * c + 1e-3 * t[:, None, None, None]


def test_student_phase_matches_a_transcription_and_target_phase_is_the_ema():
    settings = dict(load_config("configs/distill/lcm.py").lcm)
    phases = lcm.make_phases(_toy_unet, SCHED, settings, 0.95)
    params = {
        "unet": {"w": jnp.float32(0.2), "b": jnp.float32(0.5)},
        "target": {"w": jnp.float32(0.25), "b": jnp.float32(0.4)},
    }
    teacher = {"w": jnp.float32(0.3), "b": jnp.float32(-0.6)}
    frozen = {"teacher": teacher, "uncond": jnp.zeros((1, 5, 6))}
    x0, ctx = _rand(5), _rand(6, (3, 5, 6)) + 1.0
    batch = {"x0": jnp.asarray(x0), "context": jnp.asarray(ctx)}
    key = jax.random.PRNGKey(7)
    loss, aux = phases[0].loss_fn(params, frozen, batch, key)

    # Transcription of train_lcm_distill_sd_wds.py's step with the same draws.
    k_i, k_n, k_w = jax.random.split(key, 3)
    taus, prev, k = lcm.ddim_solver(ACP)
    index = np.asarray(jax.random.randint(k_i, (3,), 0, 50))
    start, t = taus[index].astype(np.float64), np.maximum(taus[index] - k, 0).astype(np.float64)
    noise = np.asarray(jax.random.normal(k_n, x0.shape), np.float64)
    w = np.asarray(lcm.sample_guidance(k_w, 3, 5.0, 15.0), np.float64)[:, None, None, None]
    assert np.all((w >= 5.0) & (w <= 15.0))
    b4 = lambda v: np.asarray(v, np.float64)[:, None, None, None]  # noqa: E731
    a_s = ACP[taus[index]]
    x_s = b4(np.sqrt(a_s)) * x0 + b4(np.sqrt(1 - a_s)) * noise

    def eps_of(p, x, tt, c):
        return np.asarray(
            _toy_unet(p, jnp.asarray(x, jnp.float32), jnp.asarray(tt, jnp.float32), jnp.asarray(c)), np.float64
        )

    def x0_of(eps, x, acp):
        return (x - b4(np.sqrt(1 - acp)) * eps) / b4(np.sqrt(acp))

    cs, co = lcm.scalings_for_boundary_conditions(start)
    pred = b4(cs) * x_s + b4(co) * x0_of(eps_of(params["unet"], x_s, start, ctx), x_s, a_s)
    ec, eu = eps_of(teacher, x_s, start, ctx), eps_of(teacher, x_s, start, np.zeros_like(ctx))
    x0c, x0u = x0_of(ec, x_s, a_s), x0_of(eu, x_s, a_s)
    g_x0, g_eps = x0c + w * (x0c - x0u), ec + w * (ec - eu)  # LCM's cond-based CFG
    ap = prev[index]
    x_t = b4(np.sqrt(ap)) * g_x0 + b4(np.sqrt(1 - ap)) * g_eps
    a_t = ACP[np.maximum(taus[index] - k, 0)]
    ct, cot = lcm.scalings_for_boundary_conditions(t)
    target = b4(ct) * x_t + b4(cot) * x0_of(eps_of(params["target"], x_t, t, ctx), x_t, a_t)
    d = pred - target
    np.testing.assert_allclose(float(loss), np.mean(np.sqrt(d**2 + 1e-6) - 1e-3), rtol=1e-4)

    # The target's "gradient" through optax.sgd(1 − 0.95) is the EMA update.
    import optax

    grads, _, _ = phases[1].grad_fn(params, frozen, batch, key)
    upd, _ = optax.sgd(0.05).update(grads, optax.sgd(0.05).init(params["target"]))
    new = optax.apply_updates(params["target"], upd)
    for name in ("w", "b"):
        want = 0.95 * float(params["target"][name]) + 0.05 * float(params["unet"][name])
        np.testing.assert_allclose(float(new[name]), want, rtol=1e-6)


def test_lcm_smoke_run_writes_a_loadable_student(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    argv = ["distill", "--config", "configs/distill/lcm.py:smoke", f"--config.teacher={tiny_teacher}"]
    assert cli.main(argv + ["--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "lcm" and report["train"]["steps"] == 3
    last = report["train"]["last"]
    assert np.isfinite(last["loss_student"]) and last["ok"] == 1.0
    assert [r["sampler"] for r in report["rows"]][0] == "teacher DDIM 1"

    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline(out / "model")
    assert pipe.scheduler_config["_class_name"] == "LCMScheduler"
    assert pipe.scheduler_config["original_inference_steps"] == 50
    images = np.asarray(pipe(["a red circle"], steps=2, guidance=1.0))
    assert images.shape[0] == 1 and np.isfinite(images).all()
