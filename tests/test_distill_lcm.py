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


def _toy_student(params, x, t, ctx_w):
    """A student taking (context, w-embedding [B, D]) as the w-embedding UNet does (lcm.student_unet_fn)."""
    ctx, emb = ctx_w
    return (
        _toy_unet(params, x, t, ctx)
        + params["e"] * jnp.mean(emb * jnp.arange(emb.shape[1]), axis=1)[:, None, None, None]
    )


def _np_guidance_embedding(w, dim):
    """diffusers' get_guidance_scale_embedding (the script's guidance_scale_embedding) in float64 numpy."""
    w = np.asarray(w, np.float64) * 1000.0
    half = dim // 2
    freqs = np.exp(np.arange(half) * -(np.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    return np.concatenate([np.sin(emb), np.cos(emb)], axis=1)


@pytest.mark.parametrize("dim", [0, 8])
def test_student_phase_matches_a_transcription_and_target_phase_is_the_ema(dim):
    """dim 0: the student without the w-embedding; dim 8: student and target called with guidance_embedding(w, 8)
    of the teacher's own w (the script's `guidance_scale_embedding(w, embedding_dim=...)`)."""
    settings = dict(load_config("configs/distill/lcm.py").lcm, time_cond_proj_dim=dim)
    phases = lcm.make_phases(_toy_unet, SCHED, settings, 0.95, _toy_student if dim else None)
    params = {
        "unet": {"w": jnp.float32(0.2), "b": jnp.float32(0.5)},
        "target": {"w": jnp.float32(0.25), "b": jnp.float32(0.4)},
    }
    if dim:
        params["unet"]["e"], params["target"]["e"] = jnp.float32(0.7), jnp.float32(-0.3)
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

    def eps_of(p, x, tt, c, emb=None):
        out = _toy_unet(p, jnp.asarray(x, jnp.float32), jnp.asarray(tt, jnp.float32), jnp.asarray(c))
        out = np.asarray(out, np.float64)
        if emb is not None:  # the student's w-embedding term, on the float64 embedding
            out = out + float(p["e"]) * np.mean(emb * np.arange(emb.shape[1]), axis=1)[:, None, None, None]
        return out

    emb = _np_guidance_embedding(w[:, 0, 0, 0], dim) if dim else None

    def x0_of(eps, x, acp):
        return (x - b4(np.sqrt(1 - acp)) * eps) / b4(np.sqrt(acp))

    cs, co = lcm.scalings_for_boundary_conditions(start)
    pred = b4(cs) * x_s + b4(co) * x0_of(eps_of(params["unet"], x_s, start, ctx, emb), x_s, a_s)
    ec, eu = eps_of(teacher, x_s, start, ctx), eps_of(teacher, x_s, start, np.zeros_like(ctx))
    x0c, x0u = x0_of(ec, x_s, a_s), x0_of(eu, x_s, a_s)
    g_x0, g_eps = x0c + w * (x0c - x0u), ec + w * (ec - eu)  # LCM's cond-based CFG
    ap = prev[index]
    x_t = b4(np.sqrt(ap)) * g_x0 + b4(np.sqrt(1 - ap)) * g_eps
    a_t = ACP[np.maximum(taus[index] - k, 0)]
    ct, cot = lcm.scalings_for_boundary_conditions(t)
    target = b4(ct) * x_t + b4(cot) * x0_of(eps_of(params["target"], x_t, t, ctx, emb), x_t, a_t)
    d = pred - target
    np.testing.assert_allclose(float(loss), np.mean(np.sqrt(d**2 + 1e-6) - 1e-3), rtol=1e-4)

    # The target's "gradient" through optax.sgd(1 − 0.95) is the EMA update.
    import optax

    grads, _, _ = phases[1].grad_fn(params, frozen, batch, key)
    upd, _ = optax.sgd(0.05).update(grads, optax.sgd(0.05).init(params["target"]))
    new = optax.apply_updates(params["target"], upd)
    for name in params["unet"]:
        want = 0.95 * float(params["target"][name]) + 0.05 * float(params["unet"][name])
        np.testing.assert_allclose(float(new[name]), want, rtol=1e-6)


def test_guidance_embedding_is_the_transcriptions():
    """The w-embedding the student trains on and the pipeline feeds (test_distill_teacher checks it against diffusers'
    LCM pipeline) is the transcription's above, to float32 precision of w·1000 sinusoids."""
    from jaxdiff.distill.teacher import guidance_embedding

    w = np.array([0.0, 1.0, 4.5, 7.5, 14.0], np.float32)
    for dim in (8, 256):
        np.testing.assert_allclose(np.asarray(guidance_embedding(w, dim)), _np_guidance_embedding(w, dim), atol=2e-3)


def test_student_init_adds_cond_proj_as_torch_linear_or_zeros():
    teacher = {"time_embedding": {"linear_1": {"kernel": jnp.ones((32, 128))}}, "conv_in": {"kernel": jnp.ones(3)}}
    settings = dict(load_config("configs/distill/lcm.py").lcm)
    assert settings["time_cond_proj_dim"] == 256  # the script's --unet_time_cond_proj_dim
    got = lcm.init_student_params(teacher, settings, jax.random.PRNGKey(0))
    kernel = np.asarray(got["time_embedding"]["cond_proj"]["kernel"])
    assert kernel.shape == (256, 32)  # [D, C0]: diffusers' cond_proj.weight [C0, D]
    assert np.abs(kernel).max() <= 1 / 16 and np.abs(kernel).max() > 0.9 / 16  # U(±1/√D), nn.Linear's default
    assert abs(kernel.std() - 1 / 16 / np.sqrt(3)) < 2e-3
    assert got["conv_in"] is teacher["conv_in"] and "cond_proj" not in teacher["time_embedding"]
    zeros = lcm.init_student_params(teacher, dict(settings, cond_proj_init="zeros"), jax.random.PRNGKey(0))
    assert not np.asarray(zeros["time_embedding"]["cond_proj"]["kernel"]).any()
    assert lcm.init_student_params(teacher, dict(settings, time_cond_proj_dim=0), None) is teacher
    assert lcm.student_config({"a": 1}, settings) == {"a": 1, "time_cond_proj_dim": 256}
    assert lcm.student_guidance(settings) == 11.0 and lcm.student_guidance(dict(settings, student_guidance=3.0)) == 3
    with pytest.raises(Exception, match="student_fn"):
        lcm.make_phases(_toy_unet, SCHED, settings, 0.95)


def test_lcm_smoke_run_writes_a_loadable_student(tiny_teacher, tmp_path):
    """The smoke preset trains a w-embedding student (time_cond_proj_dim 8): OUT/model keeps it in the UNet config and
    its pipeline feeds guidance_embedding(guidance − 1) without CFG."""
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
    assert json.loads((out / "model" / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 8
    assert pipe.unet.config["time_cond_proj_dim"] == 8
    assert pipe.unet.params["time_embedding"]["cond_proj"]["kernel"].shape == (8, 16)
    assert json.loads((out / "model" / "sampling_defaults.json").read_text())["guidance"] == 11.0
    assert report["lcm"]["student_guidance"] == 11.0
    images = np.asarray(pipe(["a red circle"], steps=2, guidance=11.0))
    assert images.shape[0] == 1 and np.isfinite(images).all()
    # The guidance reaches the UNet through the embedding (no CFG: a negative prompt changes nothing).
    other = np.asarray(pipe(["a red circle"], steps=2, guidance=3.0))
    assert np.abs(other - images).max() > 1e-4
    negative = np.asarray(pipe(["a red circle"], ["a blue square"], steps=2, guidance=11.0))
    np.testing.assert_array_equal(negative, images)


def _toy_lora_unet(params, x, t, ctx):
    c = jnp.tanh(jnp.mean(ctx, axis=(1, 2)))[:, None, None, None]
    return x @ params["lin"]["kernel"] + 0.5 * c + 1e-3 * t[:, None, None, None]


def test_lora_lcm_step_matches_a_transcription_with_the_student_as_its_own_target():
    """train_lcm_distill_lora_sd_wds.py: adapters on the frozen teacher, no w-embedding, the target is the LoRA
    student itself under no_grad (no EMA network), one phase."""
    settings = dict(load_config("configs/distill/lcm.py:lora").lcm, lora_rank=1, lora_alpha=2.0)
    assert lcm.embedding_dim(settings) == 0 and lcm.lora_scale(settings) == 2.0
    phases = lcm.make_phases(_toy_lora_unet, SCHED, settings, 0.95)
    assert [p.name for p in phases] == ["student"]
    kernel = np.array([[0.3, -0.1], [0.2, 0.4]], np.float32)
    teacher = {"lin": {"kernel": jnp.asarray(kernel)}}
    adapters = {"lin": {"down": jnp.asarray([[0.5], [-0.2]]), "up": jnp.asarray([[0.1, 0.3]])}}
    frozen = {"teacher": teacher, "uncond": jnp.zeros((1, 5, 6))}
    x0, ctx = _rand(8, (3, 4, 4, 2)), _rand(9, (3, 5, 6)) + 1.0
    batch = {"x0": jnp.asarray(x0), "context": jnp.asarray(ctx)}
    key = jax.random.PRNGKey(3)
    loss, _ = phases[0].loss_fn({"unet": adapters}, frozen, batch, key)

    k_i, k_n, k_w = jax.random.split(key, 3)
    taus, prev, k = lcm.ddim_solver(ACP)
    index = np.asarray(jax.random.randint(k_i, (3,), 0, 50))
    start, t = taus[index].astype(np.float64), np.maximum(taus[index] - k, 0).astype(np.float64)
    noise = np.asarray(jax.random.normal(k_n, x0.shape), np.float64)
    w = np.asarray(lcm.sample_guidance(k_w, 3, settings["w_min"], settings["w_max"]), np.float64)[:, None, None, None]
    b4 = lambda v: np.asarray(v, np.float64)[:, None, None, None]  # noqa: E731
    a_s, a_t, ap = ACP[taus[index]], ACP[np.maximum(taus[index] - k, 0)], prev[index]
    x_s = b4(np.sqrt(a_s)) * x0 + b4(np.sqrt(1 - a_s)) * noise
    merged = kernel.astype(np.float64) + 2.0 * np.asarray(adapters["lin"]["down"]) @ np.asarray(adapters["lin"]["up"])

    def eps_of(kern, x, tt, c):
        cc = np.tanh(np.mean(c, axis=(1, 2)))[:, None, None, None]
        return x @ kern + 0.5 * cc + 1e-3 * b4(tt)

    def x0_of(eps, x, acp):
        return (x - b4(np.sqrt(1 - acp)) * eps) / b4(np.sqrt(acp))

    cs, co = lcm.scalings_for_boundary_conditions(start)
    pred = b4(cs) * x_s + b4(co) * x0_of(eps_of(merged, x_s, start, ctx), x_s, a_s)
    ec, eu = eps_of(kernel, x_s, start, ctx), eps_of(kernel, x_s, start, np.zeros_like(ctx))
    x0c, x0u = x0_of(ec, x_s, a_s), x0_of(eu, x_s, a_s)
    x_t = b4(np.sqrt(ap)) * (x0c + w * (x0c - x0u)) + b4(np.sqrt(1 - ap)) * (ec + w * (ec - eu))
    ct, cot = lcm.scalings_for_boundary_conditions(t)
    target = b4(ct) * x_t + b4(cot) * x0_of(eps_of(merged, x_t, t, ctx), x_t, a_t)
    d = pred - target
    np.testing.assert_allclose(float(loss), np.mean(np.sqrt(d**2 + 1e-6) - 1e-3), rtol=1e-4)

    # No gradient through the target: the adapters' gradient is that of the loss with the target a constant.
    grads = jax.grad(lambda a: phases[0].loss_fn({"unet": a}, frozen, batch, key)[0])(adapters)
    t32 = jnp.asarray(target, jnp.float32)

    def with_constant_target(a):
        from jaxdiff import lora

        kern = lora.merge(teacher, a, 1.0, 2.0)["lin"]["kernel"]
        xs = jnp.asarray(x_s, jnp.float32)
        eps = xs @ kern + 0.5 * jnp.tanh(jnp.mean(ctx, axis=(1, 2)))[:, None, None, None] + 1e-3 * b4(start)
        p = b4(cs) * xs + b4(co) * (xs - b4(np.sqrt(1 - a_s)) * eps) / b4(np.sqrt(a_s))
        return jnp.mean(jnp.sqrt((p - t32) ** 2 + 1e-6) - 1e-3)

    want = jax.grad(with_constant_target)(adapters)
    for name in ("down", "up"):
        np.testing.assert_allclose(grads["lin"][name], want["lin"][name], rtol=2e-3, atol=1e-6)


def test_lora_lcm_networks_and_initial_adapters():
    config = load_config("configs/distill/lcm.py:lora")
    assert config.lcm.lora_rank == 64 and config.lcm.lora_alpha == 64.0 and config.train.learning_rate == 1e-4
    config.lcm.lora_rank = 2
    import sys

    sys.path.insert(0, "tests")
    from test_unet import TINY_CONFIGS, UNET

    from jaxdiff.models.model import create

    unet = create(UNET, TINY_CONFIGS["sd1"], abstract=False)
    networks, phases = lcm.build(config, _toy_lora_unet, None, SCHED)
    assert [n.name for n in networks] == ["unet"] and len(phases) == 1
    params = lcm.initial_params(config, unet.params, unet.params)
    adapters = params["unet"]
    assert set(params) == {"unet"}
    names = set(adapters)
    assert "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_out_0" in names
    assert "down_blocks_0/attentions_0/transformer_blocks_0/ff/net_0/proj" in names
    assert "down_blocks_0/resnets_0/time_emb_proj" in names and "down_blocks_0/downsamplers_0/conv" in names
    assert "up_blocks_0/upsamplers_0/conv" in names and "down_blocks_1/resnets_0/conv_shortcut" in names
    assert not any(n.startswith(("conv_in", "conv_out", "time_embedding")) for n in names)
    assert all(not np.asarray(a["up"]).any() and a["down"].shape[-1] == 2 for a in adapters.values())
    conv = adapters["down_blocks_0/resnets_0/conv1"]["down"]
    assert conv.shape == (3, 3, 32, 2) and np.abs(np.asarray(conv)).max() <= 1 / np.sqrt(3 * 3 * 32)
