"""Rectified-flow losses and sampler against distill_metrics.md §1; the pair store's resume and key checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_distill_sid

from jaxdiff.distill import pairs as P
from jaxdiff.distill import rectified_flow as rf
from jaxdiff.errors import UserError
from jaxdiff.sampling import denoise
from jaxdiff.sampling.schedulers.flow_euler import FlowEuler

tiny_teacher = test_distill_sid.tiny_teacher  # the fixture: a tiny random UNet in the shapes pipeline


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


# ------------------------------------------------------------------------------------------------ perceptual loss


def _tiny_vae_pipe():
    """A pipeline-shaped stand-in with a differentiable "VAE": latents [B, 8, 8, 4] -> images [B, 32, 32, 3]
    (4x nearest upsampling and a fixed channel mix), in front of the shipped shapes probe."""
    import types

    mix = np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32) * 0.5

    def decode(params, z):
        return jnp.repeat(jnp.repeat(jnp.tanh(z @ params), 4, axis=1), 4, axis=2)

    vae = types.SimpleNamespace(config={"scaling_factor": 1.0}, params=jnp.asarray(mix), decode=decode)
    return types.SimpleNamespace(vae=vae)


def test_probe_loss_is_zero_at_the_target_positive_elsewhere_with_finite_gradients():
    features = rf.probe_perceptual(_tiny_vae_pipe())  # the shipped probe (jaxdiff/assets/shapes_probe)
    rng = np.random.default_rng(0)
    z0 = jnp.asarray(rng.standard_normal((2, 8, 8, 4)).astype(np.float32))
    ctx = jnp.zeros((2, 1, 1), jnp.float32)
    w_star = 0.5  # (1 − w) z0 = z0 − w z0 exactly in float32
    z1 = (1 - w_star) * z0  # the linear "UNet" out = w x gives x̂1 = z0 + v = (1 − w) z0: exact at w = w*
    apply = lambda params, x, t, c: params * x  # noqa: E731
    loss_fn = rf.make_loss(apply, "t0", 0.0, "distill_probe", perceptual=features)
    batch = {"z0": z0, "z1": z1, "context": ctx}
    key = jax.random.PRNGKey(0)
    at_target, aux = loss_fn({"unet": jnp.float32(w_star)}, {}, batch, key)
    assert float(at_target) == 0.0 and float(aux["l2"]) == 0.0
    grad_fn = jax.value_and_grad(lambda w: loss_fn({"unet": w}, {}, batch, key)[0])
    value, grad = grad_fn(jnp.float32(0.8))
    assert float(value) > 1e-4 and np.isfinite(float(grad)) and float(grad) > 0  # moving w toward w* lowers it
    # The mix: perceptual_weight·D_probe + l2_weight·D_L2, each logged.
    mixed = rf.make_loss(apply, "t0", 0.0, "distill_probe", perceptual=features, perceptual_weight=2.0, l2_weight=0.5)
    v2, aux2 = mixed({"unet": jnp.float32(0.8)}, {}, batch, key)
    np.testing.assert_allclose(v2, 2 * value + 0.5 * aux2["l2"], rtol=1e-5)
    np.testing.assert_allclose(aux2["perceptual"], value, rtol=1e-5)


def test_perceptual_losses_refuse_clearly():
    apply = lambda params, x, t, c: x  # noqa: E731
    with pytest.raises(UserError, match="LPIPS needs the VGG/AlexNet"):
        rf.make_loss(apply, "t0", 0.0, "distill_lpips")
    with pytest.raises(UserError, match="needs the perceptual network"):
        rf.make_loss(apply, "t0", 0.0, "distill_probe")


def test_instaflow_probe_smoke_training(tiny_teacher):
    """3 training steps of InstaFlow with the probe loss on the tiny teacher, built as `jaxdiff distill` builds
    them (`rf.build` with the instaflow config's "probe" variant: the teacher's VAE decode and the shipped probe).
    (The whole command, pairs, runner and report, is tested on reflow: tests/test_distill_command.py.)"""
    import optax

    from jaxdiff.config import load_config
    from jaxdiff.sampling.pipeline import load_pipeline

    config = load_config("configs/distill/instaflow.py:runlocal,probe")
    config.teacher = str(tiny_teacher)
    pipe = load_pipeline(tiny_teacher)
    unet = pipe.unet
    networks, phases = rf.build(config, lambda p, x, tt, ctx: unet.apply(p, x, tt, ctx))
    loss_fn = phases[0].loss_fn
    rng = np.random.default_rng(0)
    batch = {
        "z0": jnp.asarray(rng.standard_normal((2, 8, 8, 4)).astype(np.float32)),
        "z1": jnp.asarray(rng.standard_normal((2, 8, 8, 4)).astype(np.float32)),
        "context": pipe.encode_prompts(["a red circle", "a blue square"])[0],
    }
    tx = optax.adam(1e-3)
    params = {"unet": unet.params}
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        (value, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, {}, batch, jax.random.PRNGKey(0))
        updates, opt = tx.update(grads, opt, params)
        norm = optax.global_norm(grads)
        return optax.apply_updates(params, updates), opt, value, aux, norm

    values = []
    for _ in range(3):
        params, opt, value, aux, norm = step(params, opt)
        values.append(float(value))
        assert np.isfinite([value, aux["perceptual"], aux["l2"], norm]).all() and float(norm) > 0
    assert values[0] > 0 and values[-1] < values[0]  # three Adam steps on one batch lower it
