"""Schedulers vs diffusers' PyTorch ones: identical timesteps, each step within 1e-5 for the same model outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from parity import assert_parity  # noqa: E402

from jaxdiff.sampling import SCHEDULERS, make_scheduler  # noqa: E402
from jaxdiff.sampling.schedulers import add_noise, velocity  # noqa: E402

REL = 1e-5
SHAPE = (2, 4, 8, 8)
CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "lcm": "LCMScheduler",
}
# Stable Diffusion 1.x's scheduler_config.json (a PNDM config that every scheduler is built from)
SD = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "timestep_spacing": "leading",
}
TRAILING = dict(SD, timestep_spacing="trailing")
LINSPACE = dict(SD, timestep_spacing="linspace")
V_PRED = dict(SD, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=False)
DEFAULT = {}  # diffusers' own defaults (linear betas, clip_sample=True where it exists)
COSINE_SAMPLE = dict(SD, beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=True)

CASES = {
    "ddpm": {
        "sd": SD,
        "trailing": TRAILING,
        "linspace": LINSPACE,
        "v": V_PRED,
        "default": DEFAULT,
        "large": dict(SD, variance_type="fixed_large", prediction_type="sample"),
    },
    "ddim": {
        "sd": SD,
        "trailing": TRAILING,
        "linspace": LINSPACE,
        "v": V_PRED,
        "default": DEFAULT,
        "cosine_sample": COSINE_SAMPLE,
        "eta": dict(SD, eta=0.7),
        "zero_snr": dict(V_PRED, rescale_betas_zero_snr=True),
    },
    "euler": {
        "sd": SD,
        "trailing": TRAILING,
        "linspace": LINSPACE,
        "v": V_PRED,
        "default": DEFAULT,
        "karras": dict(SD, use_karras_sigmas=True),
        "karras_linspace": dict(LINSPACE, use_karras_sigmas=True),
        "sample_sigma_min": dict(TRAILING, prediction_type="sample", final_sigmas_type="sigma_min"),
    },
    "dpm++2m": {
        "sd": SD,
        "trailing": TRAILING,
        "linspace": LINSPACE,
        "v": V_PRED,
        "default": DEFAULT,
        "karras": dict(SD, use_karras_sigmas=True),
        "heun_sample": dict(COSINE_SAMPLE, solver_type="heun"),
        "second_order_final": dict(SD, lower_order_final=False, final_sigmas_type="sigma_min"),
        "order1": dict(SD, solver_order=1),
    },
    "pndm": {
        "sd": SD,
        "trailing": TRAILING,
        "linspace": LINSPACE,
        "v": V_PRED,
        "prk": dict(SD, skip_prk_steps=False),
        "prk_linear": dict(DEFAULT, skip_prk_steps=False),
    },
    "flow_euler": {
        "default": DEFAULT,
        "shift3": {"shift": 3.0},
        "terminal": {"shift": 3.0, "shift_terminal": 0.02},
        "karras": {"shift": 1.5, "use_karras_sigmas": True},
    },
    # more LCM cases (1-8 steps, original_inference_steps=4, denoised outputs) in test_scheduler_lcm.py
    "lcm": {
        "sd": SD,
        "v": V_PRED,
        "default": DEFAULT,
    },
}
PARAMS = [(n, c, N) for n, cs in CASES.items() for c in cs for N in (10, 25)]
NOISY = {"ddpm", "lcm"}  # draw fresh noise from a torch.Generator at every step


def reference(name, config):
    cfg = {k: v for k, v in config.items() if k != "eta"}
    return getattr(diffusers, CLASSES[name]).from_config(cfg)


def fake_model(x, t, lib):
    """A deterministic stand-in for the UNet, computed by each framework from its own sample."""
    if lib is torch:
        return 0.9 * x + 0.1 * torch.sin(t.to(torch.float32))
    return 0.9 * x + 0.1 * jnp.sin(t)


def step_noise(i):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + i))


def torch_loop(name, config, n):
    ref = reference(name, config)
    ref.set_timesteps(n)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = x * getattr(ref, "init_noise_sigma", 1.0)
    out = []
    for i, t in enumerate(ref.timesteps):
        mo = fake_model(ref.scale_model_input(x, t) if hasattr(ref, "scale_model_input") else x, t, torch)
        if name in NOISY:
            kw = {"generator": torch.Generator().manual_seed(1000 + i)}
        elif name == "ddim" and config.get("eta", 0) > 0:
            kw = {"eta": config["eta"], "variance_noise": step_noise(i)}
        else:
            kw = {}
        x = ref.step(mo, t, x, **kw).prev_sample
        out.append(x.numpy().copy())
    return ref, out


def needs_noise(name, config):
    return name in NOISY or (name == "ddim" and config.get("eta", 0) > 0)


_JIT = {}


def jitted(sched, noisy):
    key = (id(sched), noisy)
    if key not in _JIT:
        if noisy:
            step = jax.jit(lambda p, mo, i, x, c, z: sched.step(p, mo, i, x, c, None, noise=z))
        else:
            step = jax.jit(lambda p, mo, i, x, c, z: sched.step(p, mo, i, x, c, None))
        _JIT[key] = (jax.jit(sched.scale_model_input), step, sched)  # keep sched alive: id() stays unique
    return _JIT[key][:2]


@pytest.mark.parametrize("name,cfg_id,n", PARAMS, ids=[f"{a}-{b}-{c}" for a, b, c in PARAMS])
def test_matches_diffusers(name, cfg_id, n):
    config = CASES[name][cfg_id]
    ref, ref_out = torch_loop(name, config, n)
    sched = make_scheduler(name, config)
    plan = sched.plan(n)
    # (1) timesteps: identical (Karras: the same up to float32 rounding of a float64 interpolation)
    ref_t = ref.timesteps.to(torch.float32).numpy()
    if "karras" in cfg_id and name != "dpm++2m":
        np.testing.assert_allclose(np.asarray(plan.timesteps), ref_t, rtol=0, atol=1e-4)
    else:
        np.testing.assert_array_equal(np.asarray(plan.timesteps), ref_t)
    assert sched.num_model_calls(plan) == len(ref_t) == len(ref_out)
    assert_parity(plan.init_noise_sigma, float(getattr(ref, "init_noise_sigma", 1.0)), rel=REL, what="init_noise_sigma")
    # (2) every step, same model-output function, same injected noise
    scale, step = jitted(sched, needs_noise(name, config))
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).numpy()
    x = jnp.asarray(x0) * plan.init_noise_sigma
    carry = sched.init_carry(plan, x)
    for i in range(len(ref_out)):
        i32 = jnp.int32(i)
        mo = fake_model(scale(plan, x, i32), plan.timesteps[i], jnp)
        z = jnp.asarray(step_noise(i).numpy()) if needs_noise(name, config) else None
        x, carry = step(plan, mo, i32, x, carry, z)
        assert_parity(x, ref_out[i], rel=REL, what=f"{name}/{cfg_id}/N={n} step {i}")


def compiled_loop(sched, plan, x, noises=None, key=None):
    """The whole denoising loop in one jitted program with a traced loop index."""

    @jax.jit
    def run(plan, x, noises, key):
        def body(i, state):
            x, carry = state
            mo = fake_model(sched.scale_model_input(plan, x, i), plan.timesteps[i], jnp)
            kw = {"noise": noises[i]} if noises is not None else {}
            k = jax.random.fold_in(key, i) if key is not None else None
            return sched.step(plan, mo, i, x, carry, k, **kw)

        x = x * plan.init_noise_sigma
        return jax.lax.fori_loop(0, plan.timesteps.shape[0], body, (x, sched.init_carry(plan, x)))[0]

    return run(plan, x, noises, key)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_fori_loop_matches_diffusers(name):
    config = SD if name != "flow_euler" else {"shift": 3.0}
    n = 10
    _, ref_out = torch_loop(name, config, n)
    sched = make_scheduler(name, config)
    plan = sched.plan(n)
    x0 = jnp.asarray(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).numpy())
    noises = jnp.stack([jnp.asarray(step_noise(i).numpy()) for i in range(len(ref_out))]) if name in NOISY else None
    out = compiled_loop(sched, plan, x0, noises)
    assert_parity(out, ref_out[-1], rel=REL, what=f"{name} fori_loop")


def test_random_noise_from_key():
    for name, cfg in (("ddpm", SD), ("ddim", dict(SD, eta=1.0))):
        sched = make_scheduler(name, cfg)
        plan = sched.plan(10)
        x0 = jnp.ones(SHAPE)
        a = compiled_loop(sched, plan, x0, key=jax.random.key(0))
        b = compiled_loop(sched, plan, x0, key=jax.random.key(0))
        c = compiled_loop(sched, plan, x0, key=jax.random.key(1))
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_array_equal(a, b)
        assert float(jnp.max(jnp.abs(a - c))) > 1e-3
    ddim = make_scheduler("ddim", SD)  # eta given per step (traced) and as a make_scheduler option
    plan = ddim.plan(10)
    x, z = jnp.ones(SHAPE), jnp.zeros(SHAPE)
    a = jax.jit(lambda e: ddim.step(plan, x, 3, x, (), None, eta=e, noise=z)[0])(0.5)
    b = make_scheduler("ddim", SD, eta=0.5).step(plan, x, 3, x, (), None, noise=z)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_training_helpers_match_diffusers():
    ref = diffusers.DDPMScheduler.from_config(SD)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([3, 777])
    sched = make_scheduler("ddpm", SD)
    acp = sched.alphas_cumprod
    np.testing.assert_array_equal(acp, ref.alphas_cumprod.numpy())
    args = (jnp.asarray(x0.numpy()), jnp.asarray(noise.numpy()), jnp.asarray(t.numpy()))
    assert_parity(add_noise(acp, *args), ref.add_noise(x0, noise, t).numpy(), rel=REL)
    assert_parity(velocity(acp, *args), ref.get_velocity(x0, noise, t).numpy(), rel=REL)
    assert_parity(sched.add_noise(None, *args), ref.add_noise(x0, noise, t).numpy(), rel=REL)
    v = make_scheduler("ddim", V_PRED)
    assert_parity(v.training_target(*args), ref.get_velocity(x0, noise, t).numpy(), rel=REL)
    np.testing.assert_array_equal(sched.training_target(*args), args[1])
    # Euler with a plan: diffusers' sigma-scaled add_noise at a plan timestep (img2img)
    eul_ref = diffusers.EulerDiscreteScheduler.from_config(SD)
    eul_ref.set_timesteps(10)
    te = eul_ref.timesteps[[2, 5]]
    eul = make_scheduler("euler", SD)
    got = eul.add_noise(eul.plan(10), args[0], args[1], jnp.asarray(te.numpy()))
    assert_parity(got, eul_ref.add_noise(x0, noise, te).numpy(), rel=REL)
    flow = make_scheduler("flow_euler", {})
    xt = flow.add_noise(None, args[0], args[1], jnp.asarray([250.0, 1000.0]))
    np.testing.assert_allclose(xt[1], args[1][1], rtol=1e-6)
    np.testing.assert_allclose(xt[0], 0.75 * args[0][0] + 0.25 * args[1][0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name,config,key",
    [
        ("ddim", dict(SD, thresholding=True), "thresholding"),
        ("ddpm", dict(SD, beta_schedule="exotic"), "beta_schedule"),
        ("euler", dict(SD, prediction_type="flow"), "prediction_type"),
        ("ddim", dict(SD, timestep_spacing="random"), "timestep_spacing"),
        ("dpm++2m", dict(SD, algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        ("dpm++2m", dict(SD, solver_order=3), "solver_order"),
        ("euler", dict(SD, interpolation_type="log_linear"), "interpolation_type"),
        ("ddpm", dict(SD, variance_type="learned_range"), "variance_type"),
        ("pndm", dict(SD, prediction_type="sample"), "prediction_type"),
        ("flow_euler", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ],
)
def test_unsupported_config_values_name_the_key(name, config, key):
    with pytest.raises(ValueError, match=key):
        make_scheduler(name, config)


def test_names_and_bad_steps():
    assert set(SCHEDULERS) == {"ddpm", "ddim", "euler", "dpm++2m", "pndm", "flow_euler", "lcm"}
    assert make_scheduler("PNDMScheduler", SD).name == "pndm"
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("heun", SD)
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            make_scheduler("ddim", SD).plan(n)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_scheduler("ddim", SD).plan(1001)
