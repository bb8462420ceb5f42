"""The guided denoising loop: partial runs, recording, guidance, stochastic steps, one compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.sampling import make_scheduler
from jaxdiff.sampling.denoise import Trajectory, denoise

SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)
N = 8


def model(x, t, context):
    """A 'UNet' depending on x, t and the context, cheap enough to trace many times."""
    return 0.1 * x + jnp.mean(context, axis=(1, 2))[:, None, None, None] + 1e-4 * t[:, None, None, None]


def _inputs(batch=2):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 4, 4, 3)).astype(np.float32))
    cond = jnp.asarray(rng.standard_normal((batch, 5, 6)).astype(np.float32))
    uncond = jnp.asarray(rng.standard_normal((batch, 5, 6)).astype(np.float32))
    return x, cond, uncond


@pytest.fixture(scope="module")
def ddim():
    sched = make_scheduler("ddim", SCHEDULER)
    return sched, sched.plan(N)


def test_a_partial_run_is_the_matching_slice_of_the_full_trajectory(ddim):
    sched, plan = ddim
    x, cond, uncond = _inputs()
    full = jax.jit(lambda x: denoise(model, sched, plan, x, cond, uncond, 4.0, record=True))
    last, traj = full(x)
    assert isinstance(traj, Trajectory)
    assert traj.before.shape == traj.after.shape == traj.prediction.shape == (N,) + x.shape
    np.testing.assert_array_equal(traj.timesteps, plan.timesteps)
    np.testing.assert_array_equal(traj.before[0], x)
    np.testing.assert_array_equal(traj.before[1:], traj.after[:-1])
    np.testing.assert_array_equal(last, traj.after[-1])
    # start..end from the latent at step start, with static and with traced bounds
    part = jax.jit(lambda x, start, end: denoise(model, sched, plan, x, cond, uncond, 4.0, start=start, end=end))
    for start, end in [(0, 3), (2, 5), (5, N), (3, 3)]:
        expected = traj.after[end - 1] if end > start else traj.before[start]
        np.testing.assert_allclose(part(traj.before[start], start, end), expected, rtol=1e-6, atol=1e-6)
        static = jax.jit(lambda x: denoise(model, sched, plan, x, cond, uncond, 4.0, start=start, end=end))
        np.testing.assert_allclose(static(traj.before[start]), expected, rtol=1e-6, atol=1e-6)
    # a recorded partial run is the slice of the full recording
    _, sub = jax.jit(lambda x: denoise(model, sched, plan, x, cond, uncond, 4.0, start=2, end=5, record=True))(
        traj.before[2]
    )
    for got, want in zip(sub, traj):
        np.testing.assert_allclose(got, want[2:5], rtol=1e-6, atol=1e-6)


def test_the_recorded_last_latent_is_the_unrecorded_result_bitwise(ddim):
    sched, plan = ddim
    x, cond, uncond = _inputs()
    plain = jax.jit(lambda x: denoise(model, sched, plan, x, cond, uncond, 7.5))(x)
    last, traj = jax.jit(lambda x: denoise(model, sched, plan, x, cond, uncond, 7.5, record=True))(x)
    np.testing.assert_array_equal(plain, last)
    np.testing.assert_array_equal(plain, traj.after[-1])


def test_guidance_combines_the_cond_and_uncond_predictions(ddim):
    sched, plan = ddim
    x, cond, uncond = _inputs()
    _, traj = denoise(model, sched, plan, x, cond, uncond, 3.0, end=1, record=True)
    t = jnp.broadcast_to(plan.timesteps[0], (x.shape[0],))
    e_c, e_u = model(x, t, cond), model(x, t, uncond)
    np.testing.assert_allclose(traj.prediction[0], e_u + 3.0 * (e_c - e_u), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(traj.after[0], sched.step(plan, e_u + 3.0 * (e_c - e_u), 0, x)[0], rtol=1e-6, atol=1e-6)
    # a traced guidance works the same
    traced = jax.jit(lambda g: denoise(model, sched, plan, x, cond, uncond, g))(jnp.float32(3.0))
    np.testing.assert_allclose(traced, denoise(model, sched, plan, x, cond, uncond, 3.0), rtol=1e-6, atol=1e-6)


def test_with_guidance_one_the_uncond_branch_has_no_effect(ddim):
    sched, plan = ddim
    x, cond, uncond = _inputs()
    batches = []

    def counting(x, t, context):
        batches.append(x.shape[0])
        return model(x, t, context)

    run = jax.jit(lambda u: denoise(counting, sched, plan, x, cond, u, 1.0))
    a, b = run(uncond), run(uncond + 100.0)
    c = jax.jit(lambda: denoise(counting, sched, plan, x, cond))()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert set(batches) == {x.shape[0]}  # the model never saw the uncond rows
    # any other guidance uses them
    assert not np.array_equal(jax.jit(lambda u: denoise(model, sched, plan, x, cond, u, 1.5))(uncond), a)


def test_pytree_conditioning_and_stochastic_steps():
    sched = make_scheduler("ddpm", SCHEDULER)
    plan = sched.plan(5)
    x, cond, uncond = _inputs()

    def pair_model(x, t, c):
        context, scale = c
        return model(x, t, context) * scale[:, None, None, None]

    conds = (cond, jnp.full((2,), 2.0))
    unconds = (uncond, jnp.ones((2,)))
    key = jax.random.PRNGKey(3)
    run = jax.jit(lambda key: denoise(pair_model, sched, plan, x, conds, unconds, 2.0, key=key))
    a = run(key)
    last, _ = jax.jit(lambda key: denoise(pair_model, sched, plan, x, conds, unconds, 2.0, key=key, record=True))(key)
    np.testing.assert_array_equal(a, last)
    np.testing.assert_array_equal(run(key), a)  # deterministic in the key
    assert not np.allclose(run(jax.random.PRNGKey(4)), a)  # and the noise comes from it
    with pytest.raises(ValueError, match="PRNG key"):
        denoise(pair_model, sched, plan, x, conds, unconds, 2.0)


def test_one_compiled_loop_without_host_callbacks_unless_asked(ddim):
    sched, plan = ddim
    x, cond, uncond = _inputs()
    jaxpr = str(jax.make_jaxpr(lambda x: denoise(model, sched, plan, x, cond, uncond, 7.5))(x))
    assert jaxpr.count("scan[") + jaxpr.count("while[") == 1 and "callback" not in jaxpr
    seen = []
    jax.block_until_ready(
        jax.jit(lambda x: denoise(model, sched, plan, x, cond, uncond, 7.5, start=2, on_step=seen.append))(x)
    )
    jax.effects_barrier()
    assert [int(i) for i in seen] == list(range(2, N))
    with pytest.raises(TypeError, match="static start and end"):
        jax.jit(lambda e: denoise(model, sched, plan, x, cond, uncond, 7.5, end=e, record=True))(3)
