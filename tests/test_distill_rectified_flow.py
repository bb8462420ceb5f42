"""Rectified-flow losses and sampler against distill_metrics.md §1; the pair store's resume and key checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.distill import pairs as P
from jaxdiff.distill import rectified_flow as rf
from jaxdiff.errors import UserError
from jaxdiff.sampling import denoise
from jaxdiff.sampling.schedulers.flow_euler import FlowEuler


def _toy(seed=0, n=4):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 3, 3, 2)).astype(np.float32) for _ in range(3)]


def test_reflow_loss_is_the_formula():
    z0, z1, v = _toy()
    expected = np.mean([np.mean((v[i] - (z1[i] - z0[i])) ** 2) for i in range(len(v))])
    np.testing.assert_allclose(rf.reflow_loss(v, z0, z1), expected, rtol=1e-6)


def test_make_loss_feeds_the_spec_time_and_point():
    z0, z1, ctx = _toy(1)
    seen = {}

    def apply(params, x, t, c):  # a linear "UNet": out = w * x
        seen["x"], seen["t"] = x, t
        return params * x

    eps = 1e-3
    loss_fn = rf.make_loss(apply, "uniform", eps, "l2")
    rng = jax.random.PRNGKey(3)
    w = jnp.float32(0.7)
    value, aux = loss_fn({"unet": w}, {}, {"z0": z0, "z1": z1, "context": ctx}, rng)
    u = np.asarray(jax.random.uniform(rng, (4,)))
    t = u * (1 - eps) + eps
    x_t = t[:, None, None, None] * z1 + (1 - t[:, None, None, None]) * z0
    np.testing.assert_allclose(seen["t"], (1 - t) * 1000, rtol=1e-5)
    v_rf = -0.7 * x_t  # the output is the flow velocity z0 − z1: v_RF = −output
    expected = np.mean(np.mean((v_rf - (z1 - z0)) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert float(aux["t_mean"]) == pytest.approx(t.mean(), rel=1e-5)
    # One-step distillation at t = 0: D(z1, z0 + v(z0)) is the velocity loss at t = 0, timestep 1000.
    d = rf.make_loss(apply, "t0", 0.0, "distill_l2")({"unet": w}, {}, {"z0": z0, "z1": z1, "context": ctx}, rng)[0]
    np.testing.assert_allclose(seen["t"], 1000.0)
    np.testing.assert_allclose(d, rf.reflow_loss(-0.7 * z0, z0, z1), rtol=1e-5)


def test_time_schedules():
    key = jax.random.PRNGKey(0)
    t = np.asarray(rf.sample_t(key, 1000, 4, 1e-3))
    np.testing.assert_allclose(np.unique(t), np.arange(4) * (1 - 1e-3) / 4 + 1e-3, rtol=1e-6)
    assert np.all(np.asarray(rf.sample_t(key, 3, "t1", 1e-3)) == 1.0)
    with pytest.raises(UserError):
        rf.sample_t(key, 3, "bogus", 1e-3)


def test_uniform_euler_follows_a_straight_flow_exactly():
    z0, z1, _ = _toy(2)
    plan = rf.uniform_plan(3)
    np.testing.assert_allclose(plan.sigmas, [1, 2 / 3, 1 / 3, 0], rtol=1e-6)
    np.testing.assert_allclose(plan.timesteps, [1000, 2000 / 3, 1000 / 3], rtol=1e-6)
    # diffusers' FlowMatchEuler spacing agrees at one step (what `pipe(steps=1, scheduler="flow_euler")` runs).
    one = FlowEuler({}).plan(1)
    np.testing.assert_allclose(one.sigmas, rf.uniform_plan(1).sigmas)
    np.testing.assert_allclose(one.timesteps, rf.uniform_plan(1).timesteps)
    model = lambda x, t, c: jnp.asarray(z0 - z1)  # noqa: E731  the straight flow's velocity, constant in t
    out = denoise.denoise(model, FlowEuler({}), plan, jnp.asarray(z0), None)
    np.testing.assert_allclose(out, z1, atol=1e-5)


def _shard(seed):
    calls = []

    def make(k):
        calls.append(k)
        z0 = P.shard_noise(seed, k, 4, (2, 2, 1))
        return {"z0": z0, "z1": 2 * z0, "prompt_index": P.shard_prompts(seed, k, 4, 3)}

    return make, calls


def test_pair_store_resumes_after_a_kill(tmp_path):
    key, prompts = {"teacher_unet_sha256": "abc", "steps": 2}, ["a", "b", "c"]
    full = P.PairStore.open(tmp_path / "full", key, 4, prompts)
    make, _ = _shard(0)
    full.fill(14, make)
    # A run killed while writing shard 2: shards 0, 1 on disk, a temporary file of shard 2 left behind.
    store = P.PairStore.open(tmp_path / "killed", key, 4, prompts)
    make, calls = _shard(0)

    def dying(k):
        if k == 2:
            (tmp_path / "killed" / ".shard_00002.npz.tmp-1-dead").write_bytes(b"partial")
            raise KeyboardInterrupt
        return make(k)

    with pytest.raises(KeyboardInterrupt):
        store.fill(14, dying)
    assert store.complete() == [0, 1]
    resumed = P.PairStore.open(tmp_path / "killed", key, 4, prompts)
    calls.clear()
    assert resumed.fill(14, make) == 2
    assert calls == [2, 3]  # only the missing shards
    a, b = full.load(14), resumed.load(14)
    assert len(a["z0"]) == 14
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_pair_store_refuses_another_teacher(tmp_path):
    P.PairStore.open(tmp_path / "s", {"teacher_unet_sha256": "abc", "steps": 2}, 4, ["a"])
    before = sorted(p.name for p in (tmp_path / "s").iterdir())
    with pytest.raises(UserError, match="another teacher or solver setting.*teacher_unet_sha256"):
        P.PairStore.open(tmp_path / "s", {"teacher_unet_sha256": "xyz", "steps": 2}, 4, ["a"])
    with pytest.raises(UserError, match="prompts_sha256"):
        P.PairStore.open(tmp_path / "s", {"teacher_unet_sha256": "abc", "steps": 2}, 4, ["b"])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == before
