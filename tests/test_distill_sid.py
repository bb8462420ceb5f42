"""SiD-LSG / SFD: losses vs numpy transcriptions of the spec, σ <-> t, the κ's, the override, the command."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import cli
from jaxdiff.config import load_config
from jaxdiff.distill import sid
from jaxdiff.distill import teacher as teacher_lib

RTOL = 1e-5  # float32 losses vs float64 numpy transcriptions
SCHED = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}
ACP = teacher_lib.Teacher(None, SCHED).alphas_cumprod().astype(np.float64)


def _rand(seed, shape=(3, 4, 4, 2)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the losses


def test_fake_score_losses_match_the_spec():
    eps, noise = _rand(0), _rand(1)
    rows = np.asarray(sid.fake_score_loss_rows(jnp.asarray(eps), jnp.asarray(noise)))
    want = ((eps.astype(np.float64) - noise) ** 2).reshape(3, -1).sum(1)  # SiD-LSG: Σ (ε_ψ − ε)²
    np.testing.assert_allclose(rows, want, rtol=RTOL)
    ok, weight = np.array([True, True, True]), np.ones(3, np.float32)
    np.testing.assert_allclose(sid.reduce_rows(rows, ok, weight, 3, 1.0), want.sum() * 1.0 / 3, rtol=RTOL)

    x0, x_g, sigma = _rand(2), _rand(3), np.array([0.05, 1.0, 7.0], np.float32)
    edm = np.asarray(sid.edm_fake_score_loss_rows(jnp.asarray(x0), jnp.asarray(x_g), jnp.asarray(sigma), 0.5))
    s = sigma.astype(np.float64)[:, None]
    lam = (s**2 + 0.25) / (s * 0.5) ** 2  # §3.2: λ(σ) = (σ² + σ_d²)/(σ σ_d)²
    np.testing.assert_allclose(edm, (lam * ((x0.astype(np.float64) - x_g) ** 2).reshape(3, -1)).sum(1), rtol=RTOL)


@pytest.mark.parametrize("alpha", [1.2, 1.0, 0.5])
def test_generator_loss_matches_the_spec_and_holds_only_w_fixed(alpha):
    x_g, a, b = _rand(4), _rand(5), _rand(6)
    a[2] = x_g[2]  # w = mean|x_g − a| = 0 in row 2: clipped to 1e-5
    rows = np.asarray(sid.generator_loss_rows(jnp.asarray(x_g), jnp.asarray(a), jnp.asarray(b), alpha))
    X, A, B = (v.astype(np.float64).reshape(3, -1) for v in (x_g, a, b))
    w = np.maximum(np.abs(X - A).mean(1), 1e-5)
    want = ((A - B) * ((A - X) - alpha * (A - B))).sum(1) / w  # §3.3
    np.testing.assert_allclose(rows, want, rtol=RTOL)
    if alpha == 1.0:  # the official code's α = 1 branch: (a − b)(b − x_g) / w
        np.testing.assert_allclose(rows, ((A - B) * (B - X)).sum(1) / w, rtol=RTOL)
    # Gradient in x_g with a, b fixed: only w is stop-grad, so d/dx_g = −(a − b)/w.
    g = jax.grad(lambda x: jnp.sum(sid.generator_loss_rows(x, jnp.asarray(a), jnp.asarray(b), alpha)))(jnp.asarray(x_g))
    np.testing.assert_allclose(np.asarray(g).reshape(3, -1), -(A - B) / w[:, None], rtol=RTOL, atol=1e-6)


def test_non_finite_rows_are_dropped_and_gradients_sanitised():
    x_g, a, b = _rand(7), _rand(8), _rand(9)
    a[1, 0, 0, 0] = np.nan
    ok = sid.finite_rows(jnp.asarray(x_g), jnp.asarray(a), jnp.asarray(b))
    assert np.asarray(ok).tolist() == [True, False, True]
    rows = sid.generator_loss_rows(*sid.mask_rows(ok, jnp.asarray(x_g), jnp.asarray(a), jnp.asarray(b)))
    loss = sid.reduce_rows(rows, ok, jnp.ones(3), 3)
    clean = sid.generator_loss_rows(jnp.asarray(x_g[[0, 2]]), jnp.asarray(a[[0, 2]]), jnp.asarray(b[[0, 2]]))
    np.testing.assert_allclose(loss, jnp.sum(clean) / 3, rtol=RTOL)  # the normaliser stays the whole batch
    g = jax.grad(lambda p: jnp.sum(sid.sanitize_gradients(p) * jnp.array([jnp.nan, jnp.inf, -jnp.inf, 2.0])))(
        jnp.ones(4)
    )
    assert np.asarray(g).tolist() == [0.0, 1e5, -1e5, 2.0]


# ------------------------------------------------------------------------------------------------ σ <-> t, generator


def test_sigma_timestep_round_trip():
    t = np.concatenate([np.arange(0, 1000, 37.0), np.random.default_rng(0).uniform(0, 999, 50)])
    sigma = sid.sigma_of_timestep(ACP, t)
    np.testing.assert_allclose(sid.timestep_of_sigma(ACP, sigma), t, atol=1e-8)  # float64: exact
    np.testing.assert_allclose(sid.sigma_of_timestep(ACP, sid.timestep_of_sigma(ACP, sigma)), sigma, rtol=1e-12)
    lo, hi = sid.sigma_range(ACP)
    assert sid.timestep_of_sigma(ACP, np.float64(lo / 2)) == 0.0 and sid.timestep_of_sigma(ACP, np.float64(99.0)) == 999
    # The σ of t is the teacher's own σ_t / α_t (float32 path).
    alpha, s = teacher_lib.Teacher(None, SCHED).alpha_sigma(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(
        sid.sigma_of_timestep(jnp.asarray(ACP, jnp.float32), jnp.asarray(t, jnp.float32)), s / alpha, rtol=1e-5
    )
    t32 = sid.timestep_of_sigma(jnp.asarray(ACP, jnp.float32), jnp.asarray(sigma, jnp.float32))
    np.testing.assert_allclose(t32, t, atol=2e-2)  # float32: ᾱ near 1 has few bits left
    # SiD-LSG's t_init = 625 is SiD's EDM σ_init = 2.5 on SD's scaled-linear schedule.
    assert abs(sid.timestep_of_sigma(ACP, np.float64(2.5)) - 625) < 0.2
    assert abs(sid.sigma_of_timestep(ACP, np.float64(625)) - 2.5) < 0.01


def _toy_unet(params, x, t, ctx):
    """ε-prediction toy: depends on x, t and the context (so CFG and overrides matter)."""
    c = jnp.tanh(jnp.mean(ctx, axis=(1, 2)))[:, None, None, None]
    return x * params["w"] + params["b"] * c + 1e-3 * t[:, None, None, None]


def test_generator_is_the_ddpm_x0_at_t_init():
    model = teacher_lib.Teacher(_toy_unet, SCHED)
    params = {"w": jnp.float32(0.3), "b": jnp.float32(0.7)}
    z, ctx = _rand(10), _rand(11, (3, 5, 6))
    x_g = sid.generate(model, params, jnp.asarray(z), jnp.asarray(ctx), 625)
    a = ACP[625]
    x = np.sqrt(1 - a) * z  # add_noise(0, z, t_init)
    eps = np.asarray(_toy_unet(params, jnp.asarray(x, jnp.float32), jnp.full((3,), 625.0), jnp.asarray(ctx)))
    np.testing.assert_allclose(x_g, (x - np.sqrt(1 - a) * eps) / np.sqrt(a), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ κ's and SFD


def _settings(**kw):
    s = dict(load_config("configs/distill/sid.py").sid, latent_shape=(4, 4, 2))
    s.update(kw)
    return s


def _losses(settings, teacher_ctx=None):
    phases = sid.make_phases(_toy_unet, SCHED, settings, normaliser=3)
    params = {
        "unet": {"w": jnp.float32(0.2), "b": jnp.float32(0.5)},
        "fake_score": {"w": jnp.float32(0.1), "b": jnp.float32(0.9)},
    }
    frozen = {"teacher": {"w": jnp.float32(0.4), "b": jnp.float32(-0.6)}, "uncond": jnp.zeros((1, 5, 6))}
    ctx = jnp.asarray(_rand(12, (3, 5, 6))) + 1.0
    batch = {
        "fake_context": ctx,
        "fake_weight": jnp.ones(3),
        "gen_context": ctx,
        "gen_teacher_context": ctx if teacher_ctx is None else teacher_ctx,
        "gen_weight": jnp.ones(3),
    }
    key = jax.random.PRNGKey(3)
    return [float(p.loss_fn(params, frozen, batch, key)[0]) for p in phases]


@pytest.mark.parametrize("noise", ["lsg", "edm"])
def test_lsg_scales_each_change_only_their_loss(noise):
    base = _losses(_settings(noise=noise))
    k1 = _losses(_settings(noise=noise, cfg_train_fake=4.0))
    k2 = _losses(_settings(noise=noise, cfg_eval_fake=4.0))
    k4 = _losses(_settings(noise=noise, cfg_eval_real=4.0))
    assert k1[0] != base[0] and k1[1] == base[1]  # κ1: the fake score's training only
    assert k2[0] == base[0] and k2[1] != base[1]  # κ2 = κ3: the fake score inside the generator loss
    assert k4[0] == base[0] and k4[1] != base[1]  # κ4: the teacher
    assert k2[1] != k4[1]


def test_sfd_override_changes_only_the_rows_naming_the_concept():
    prompts = ["a red circle", "a blue square", "two Discs on grey", "a discount sign", "a green triangle"]
    concept = "circle;disc"
    assert sid.contains_concept(prompts, concept).tolist() == [True, False, True, False, False]
    over = sid.override_prompts(prompts, concept, "square")
    assert over == ["a red square", "a blue square", "two square on grey", "a discount sign", "a green triangle"]
    assert sid.override_prompts(prompts, concept, "a cat", mode="prompt")[0] == "a cat"
    np.testing.assert_allclose(sid.row_weights([True, False]), [0.01, 1.0])

    # In the step, the override reaches the generator loss only (the teacher's input), never the fake score's.
    ctx3 = jnp.asarray(_rand(12, (3, 5, 6))) + 1.0
    changed = ctx3.at[1].set(-ctx3[1])
    base, over_losses = _losses(_settings()), _losses(_settings(), teacher_ctx=changed)
    assert over_losses[0] == base[0] and over_losses[1] != base[1]

    # The runner's batches: teacher contexts differ from the generator's exactly on forget rows, which get 0.01.
    config = load_config("configs/distill/sid.py:smoke,sfd")
    prompts = ["a red circle", "a blue square", "a green disc", "a grey triangle"]
    forget, index, teacher_prompts = sid.prompt_pools(prompts, config.sfd)
    assert teacher_prompts == ["a red square", "a blue square", "a green square", "a grey triangle"]
    contexts = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 3), np.float32)
    batch = sid.batch_function(config, contexts, contexts + 100, forget, index)(0)
    rows = batch["gen_context"][:, 0, 0].astype(int)
    assert len(rows) == 2 * config.train.batch_size  # the remain rows and SFD's forget batch
    assert forget[rows[config.train.batch_size :]].all()
    differs = (batch["gen_teacher_context"] != batch["gen_context"]).any(axis=(1, 2))
    np.testing.assert_array_equal(differs, forget[rows])
    np.testing.assert_allclose(batch["gen_weight"], np.where(forget[rows], 0.01, 1.0))


# ------------------------------------------------------------------------------------------------ the command


TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 128,  # the shapes text encoder's width
    "attention_head_dim": 2,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),  # cross-attention in the mid block only: a small step
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """The shapes VAE, text encoder, tokenizer and scheduler around a tiny random UNet."""
    from jaxdiff.convert import checkpoint
    from jaxdiff.models import unet
    from jaxdiff.models.model import create
    from jaxdiff.sampling.pipeline import BUILTIN, load_pipeline

    folder = tmp_path_factory.mktemp("sidteacher") / "pipe"
    shapes = load_pipeline("shapes")
    tiny = create(unet.ARCHITECTURES["UNet2DConditionModel"], TINY_UNET, abstract=True, attention="einsum")
    rng = np.random.default_rng(0)
    draw = lambda p, x: np.ones(x.shape) if p[-1].key == "scale" else 0.05 * rng.standard_normal(x.shape)  # noqa: E731
    tiny = dataclasses.replace(
        tiny, params=jax.tree_util.tree_map_with_path(lambda p, x: draw(p, x).astype(np.float32), tiny.params)
    )
    checkpoint.save_checkpoint(folder, {"unet": tiny, "vae": shapes.vae, "text_encoder": shapes.text_encoders[0]})
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(BUILTIN["shapes"] / name, folder / name)
    return folder


def test_sid_smoke_run_writes_a_one_step_student(tiny_teacher, tmp_path):
    # (kill + resume of `jaxdiff distill` is tested on reflow: tests/test_distill_command.py, the same runner)
    out = tmp_path / "run"
    argv = ["distill", "--config", "configs/distill/sid.py:smoke", f"--config.teacher={tiny_teacher}"]
    assert cli.main(argv + ["--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["steps"] == 3
    last = report["train"]["last"]
    assert np.isfinite([last["loss_fake_score"], last["loss_generator"]]).all() and last["ok"] == 1.0
    assert [r["sampler"] for r in report["rows"]] == ["teacher DDIM 1", "sid generator 1"]
    assert report["sid"]["t_init"] == 625 and report["sid"]["kappa"] == [2.0, 2.0, 2.0, 2.0]

    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline(out / "model")
    assert pipe.default_scheduler() == "euler"
    assert json.loads((out / "model" / "sampling_defaults.json").read_text())["steps"] == 1
    z = np.random.default_rng(0).standard_normal((4, 8, 8, 4)).astype(np.float32)  # the evaluation's batch size
    prompts = ["a red circle", "a blue square", "a green disc", "a yellow triangle"]
    mine = sid.sample(pipe, pipe.unet.params, prompts, z)
    # The pipeline's own one Euler step (Karras σ_max = σ(625)) is the generator (float32 round-off in σ and t).
    np.testing.assert_allclose(pipe(prompts, steps=1, guidance=1.0, latents=z), mine, atol=1e-4)
    sched = json.loads((out / "model" / "scheduler" / "scheduler_config.json").read_text())
    np.testing.assert_allclose(sched["sigma_max"], sid.sigma_of_timestep(ACP, np.float64(625)), rtol=1e-6)
