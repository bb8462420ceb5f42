"""The teacher wrapper: conversions against the spec formulas and diffusers' schedulers, both CFG conventions."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from jaxdiff.distill import teacher as T  # noqa: E402

TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
SD_SCHED = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
)


def _toy(seed=0, n=3):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n, 4, 4, 2)).astype(np.float32)
    eps = rng.standard_normal((n, 4, 4, 2)).astype(np.float32)
    return x0, eps


@pytest.mark.parametrize("kind", TYPES)
def test_conversions_round_trip(kind):
    x0, eps = _toy()
    if kind == "flow_prediction":
        sigma = np.array([0.9, 0.5, 0.1], np.float32)
        alpha = 1 - sigma
    else:
        acp = np.array([0.05, 0.5, 0.97], np.float32)
        alpha, sigma = np.sqrt(acp), np.sqrt(1 - acp)
    x = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    out = T.from_x0_eps(x0, eps, alpha, sigma, kind)
    rx0, reps = T.to_x0_eps(out, jnp.asarray(x), alpha, sigma, kind)
    np.testing.assert_allclose(rx0, x0, atol=2e-4)
    np.testing.assert_allclose(reps, eps, atol=2e-4)


def test_velocities_are_the_spec_formulas():
    x0, eps = _toy(1)
    np.testing.assert_array_equal(T.flow_velocity(x0, eps), eps - x0)  # diffusers FlowMatch: noise − data
    np.testing.assert_array_equal(T.rf_velocity(x0, eps), x0 - eps)  # RectifiedFlow: X1 − X0, t = 1 data
    acp = 0.3
    a, s = np.sqrt(acp), np.sqrt(1 - acp)
    np.testing.assert_allclose(T.v_from_x0_eps(x0, eps, a, s), a * eps - s * x0, atol=1e-6)


@pytest.mark.parametrize("kind", ("epsilon", "sample", "v_prediction"))
def test_x0_matches_diffusers_ddim(kind):
    sched = diffusers.DDIMScheduler(**SD_SCHED, prediction_type=kind)
    sched.set_timesteps(10)
    x0, eps = _toy(2, 1)
    x = np.random.default_rng(3).standard_normal(x0.shape).astype(np.float32)
    t = int(sched.timesteps[3])
    out = eps  # any model output
    ref = sched.step(torch.from_numpy(out), t, torch.from_numpy(x)).pred_original_sample.numpy()
    teacher = T.Teacher(None, dict(SD_SCHED, prediction_type=kind))
    a, s = teacher.alpha_sigma(np.array([t]))
    mine, _ = T.to_x0_eps(jnp.asarray(out), jnp.asarray(x), a, s, kind)
    np.testing.assert_allclose(mine, ref, atol=1e-5)


def test_velocity_and_flow_noise_match_diffusers():
    x0, eps = _toy(4, 2)
    ddpm = diffusers.DDPMScheduler(**SD_SCHED)
    t = np.array([10, 700])
    ref = ddpm.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
    a, s = T.Teacher(None, SD_SCHED).alpha_sigma(t)
    np.testing.assert_allclose(T.v_from_x0_eps(x0, eps, a, s), ref, atol=1e-5)
    flow = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    flow.set_timesteps(4)
    ts = flow.timesteps[:2]
    x = flow.scale_noise(torch.from_numpy(x0), ts, torch.from_numpy(eps)).numpy()
    sigma = ts.numpy() / 1000.0
    np.testing.assert_allclose((1 - sigma)[:, None, None, None] * x0 + sigma[:, None, None, None] * eps, x, atol=1e-5)
    rx0, reps = T.x0_eps_from_flow(T.flow_velocity(x0, eps), jnp.asarray(x), sigma)
    np.testing.assert_allclose(rx0, x0, atol=1e-4)
    np.testing.assert_allclose(reps, eps, atol=1e-4)


def test_vp_to_rf_point_lies_on_the_straight_line():
    x0, eps = _toy(5, 1)
    a, s = np.float32(0.6), np.float32(0.8)
    xr, t = T.vp_to_rf(jnp.asarray(a * x0 + s * eps), a, s)
    np.testing.assert_allclose(xr, t * x0 + (1 - t) * eps, atol=1e-5)  # t = 1 data, t = 0 noise


def test_cfg_conventions():
    c = np.array([2.0, -1.0])
    u = np.array([1.0, 1.0])
    np.testing.assert_allclose(T.cfg_uncond_based(c, u, 1.0), c)  # s = 1: no guidance
    np.testing.assert_allclose(T.cfg_cond_based(c, u, 0.0), c)  # w = 0: no guidance
    np.testing.assert_allclose(T.cfg_uncond_based(c, u, 3.0), u + 3.0 * (c - u))
    np.testing.assert_allclose(T.cfg_cond_based(c, u, 3.0), c + 3.0 * (c - u))
    w = 2.5
    np.testing.assert_allclose(T.cfg_cond_based(c, u, w), T.cfg_uncond_based(c, u, T.cond_based_to_uncond_based(w)))
    assert T.uncond_based_to_cond_based(T.cond_based_to_uncond_based(w)) == w
    # The same number under the two conventions is a different guidance: the off-by-one the names prevent.
    assert not np.allclose(T.cfg_cond_based(c, u, w), T.cfg_uncond_based(c, u, w))


@pytest.mark.parametrize("dim", (16, 33))
def test_guidance_embedding_matches_diffusers_lcm(dim):
    w = np.array([1.0, 3.5, 8.0], np.float32)
    ref = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), dim)
    np.testing.assert_allclose(T.guidance_embedding(w, dim), ref.numpy(), atol=2e-4)


def test_teacher_guided_uses_the_named_convention():
    def unet(params, x, t, ctx):  # a toy ε model: depends on the context's mean
        return x * 0.5 + ctx.mean(axis=(1, 2))[:, None, None, None]

    teacher = T.Teacher(unet, SD_SCHED)
    x = jnp.ones((2, 2, 2, 1))
    cond, uncond = jnp.full((2, 3, 4), 2.0), jnp.zeros((2, 3, 4))
    out_u = teacher.guided(None, x, 500, cond, uncond, 2.0, "uncond_based")
    out_c = teacher.guided(None, x, 500, cond, uncond, 1.0, "cond_based")
    np.testing.assert_allclose(out_u, out_c, atol=1e-6)  # s = 2 equals w = 1
    np.testing.assert_allclose(out_u, 0.5 + 2 * 2.0, atol=1e-6)
    x0 = teacher.guided(None, x, 500, cond, uncond, 1.0, "uncond_based", target="sample")
    a, s = teacher.alpha_sigma(np.array([500.0]))
    np.testing.assert_allclose(x0, np.broadcast_to((1.0 - s * 2.5) / a, x0.shape), atol=1e-4)
