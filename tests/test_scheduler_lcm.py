"""LCM scheduler vs diffusers' PyTorch LCMScheduler: identical timesteps (DMD2's 1/2/4-step schedules included) and,
with the same model outputs and the same injected noise, the same `denoised` and `prev_sample` at every step within
atol 1e-5 (float32 against float32). The shared parity cases and the fori_loop test are in test_schedulers.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.sampling import DIFFUSERS_CLASSES, SCHEDULERS, make_scheduler  # noqa: E402
from jaxdiff.sampling.denoise import denoise  # noqa: E402
from jaxdiff.sampling.pipeline import SCHEDULER_NAMES  # noqa: E402

ATOL = 1e-5
SHAPE = (2, 4, 8, 8)
# LCM-LoRA / LCM-Dreamshaper's scheduler_config.json (steps_offset and timestep_spacing are ignored by LCM)
LCM_SD = {
    "_class_name": "LCMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
}
PARAMS = [(p, o, n) for p in ("epsilon", "sample", "v_prediction") for o in (50, 4) for n in (1, 2, 4, 8)]
EXTRA = {
    "zero_snr_v": dict(LCM_SD, prediction_type="v_prediction", rescale_betas_zero_snr=True),
    "clip_sample": dict(LCM_SD, prediction_type="sample", clip_sample=True, clip_sample_range=0.5),
    "linear_scaling1": dict(LCM_SD, beta_schedule="linear", timestep_scaling=1.0, set_alpha_to_one=False),
    "cosine_v": dict(
        LCM_SD, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", original_inference_steps=25
    ),
}


def fake_model(x, t, lib):
    """A deterministic stand-in for the UNet, computed by each framework from its own sample."""
    if lib is torch:
        return 0.9 * x + 0.1 * torch.sin(t.to(torch.float32))
    return 0.9 * x + 0.1 * jnp.sin(t)


def step_generator(i):
    return torch.Generator().manual_seed(1000 + i)


def reference_run(config, n):
    """diffusers' trajectory: (timesteps, [(denoised, prev_sample)] per step); step i draws its noise from
    torch.Generator seeded 1000 + i."""
    ref = diffusers.LCMScheduler.from_config(config)
    ref.set_timesteps(n)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = []
    for i, t in enumerate(ref.timesteps):
        res = ref.step(fake_model(x, t, torch), t, x, generator=step_generator(i))
        x = res.prev_sample
        out.append((res.denoised.numpy().copy(), x.numpy().copy()))
    return ref.timesteps.numpy(), out


def compare(config, n, what):
    ref_t, ref_out = reference_run(config, n)
    sched = make_scheduler("lcm", config)
    plan = sched.plan(n)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), ref_t.astype(np.float32))
    assert sched.num_model_calls(plan) == len(ref_out)
    step = jax.jit(
        lambda plan, mo, i, x, z: (sched.denoised(plan, mo, i, x), sched.step(plan, mo, i, x, (), None, noise=z)[0])
    )
    x = jnp.asarray(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).numpy())
    for i, (ref_denoised, ref_prev) in enumerate(ref_out):
        # the noise diffusers drew at step i (randn_tensor on CPU is torch.randn with the generator)
        z = jnp.asarray(torch.randn(SHAPE, generator=step_generator(i)).numpy())
        denoised, x = step(plan, fake_model(x, plan.timesteps[i], jnp), jnp.int32(i), x, z)
        np.testing.assert_allclose(denoised, ref_denoised, rtol=0, atol=ATOL, err_msg=f"{what} denoised step {i}")
        np.testing.assert_allclose(x, ref_prev, rtol=0, atol=ATOL, err_msg=f"{what} prev_sample step {i}")
    np.testing.assert_array_equal(x, denoised)  # the last step returns the denoised sample, no noise


@pytest.mark.parametrize("prediction,orig,n", PARAMS, ids=[f"{p}-orig{o}-N{n}" for p, o, n in PARAMS])
def test_matches_diffusers(prediction, orig, n):
    config = dict(LCM_SD, prediction_type=prediction, original_inference_steps=orig)
    if n > orig:  # both refuse more steps than the original schedule has
        with pytest.raises(ValueError):
            diffusers.LCMScheduler.from_config(config).set_timesteps(n)
        with pytest.raises(ValueError, match="original_inference_steps"):
            make_scheduler("lcm", config).plan(n)
        return
    compare(config, n, f"{prediction}/orig={orig}/N={n}")


@pytest.mark.parametrize("cfg_id", list(EXTRA))
def test_config_variants_match_diffusers(cfg_id):
    compare(EXTRA[cfg_id], 4, cfg_id)


def test_dmd2_timesteps():
    sched = make_scheduler("LCMScheduler", dict(LCM_SD, original_inference_steps=4))
    assert sched.name == "lcm"
    for n, expected in ((1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249])):
        assert np.asarray(sched.plan(n).timesteps).tolist() == expected
    assert np.asarray(make_scheduler("lcm", {}).plan(4).timesteps).tolist() == [999, 759, 499, 259]


def test_registered():
    assert SCHEDULERS["lcm"].name == "lcm"
    assert DIFFUSERS_CLASSES["LCMScheduler"] == "lcm"
    assert SCHEDULER_NAMES["LCMScheduler"] == "lcm"
    ref = {k: v for k, v in diffusers.LCMScheduler().config.items() if not k.startswith("_")}
    assert make_scheduler("lcm", {}).config == ref  # diffusers' defaults


@pytest.mark.parametrize(
    "config,key",
    [
        ({"thresholding": True}, "thresholding"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"original_inference_steps": 0}, "original_inference_steps"),
        ({"original_inference_steps": 1001}, "original_inference_steps"),
    ],
)
def test_unsupported_config_values_name_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        make_scheduler("lcm", config)


def model(x, t, context):
    return 0.9 * x + 0.1 * jnp.sin(t)[:, None, None, None] + 0.01 * jnp.mean(context, axis=(1, 2))[:, None, None, None]


def test_jitted_sampling_loop():
    """The compiled denoising loop (fori_loop, traced step index) with a key: fresh noise between steps."""
    sched = make_scheduler("lcm", dict(LCM_SD, original_inference_steps=4))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32))
    cond = jnp.asarray(rng.standard_normal((2, 3, 5)).astype(np.float32))
    run = jax.jit(lambda plan, x, key: denoise(model, sched, plan, x, cond, key=key))
    plan = sched.plan(4)
    a, b, c = run(plan, x, jax.random.key(0)), run(plan, x, jax.random.key(0)), run(plan, x, jax.random.key(1))
    assert bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3
    # One step (DMD2's single-step student) needs no key: the result is diffusers' denoised sample.
    one = sched.plan(1)
    got = jax.jit(lambda plan, x: denoise(model, sched, plan, x, cond))(one, x)
    ref = diffusers.LCMScheduler.from_config(dict(LCM_SD, original_inference_steps=4))
    ref.set_timesteps(1)
    t = ref.timesteps[0]
    mo = model(x, jnp.full((2,), float(t)), cond)
    want = ref.step(torch.tensor(np.asarray(mo)), t, torch.tensor(np.asarray(x))).prev_sample.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    # Several steps without key or noise: refused when the step index is traced.
    with pytest.raises(ValueError, match="PRNG key"):
        jax.jit(lambda plan, x: denoise(model, sched, plan, x, cond))(plan, x)
