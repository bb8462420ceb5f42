"""DMD2: losses vs PyTorch transcriptions of the official code, the student's timesteps, backward simulation, the
GAN head, and the command (kill + resume, GAN, a 4-step student sampled by its LCMScheduler pipeline)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_distill_sid import ACP, SCHED, tiny_teacher  # noqa: F401  (tiny_teacher is a fixture)

from jaxdiff import cli
from jaxdiff.distill import dmd2
from jaxdiff.distill import teacher as teacher_lib
from jaxdiff.errors import UserError

torch = pytest.importorskip("torch")
ATOL = 1e-5  # float32 JAX vs float32 PyTorch on tensors of ~unit scale


def _rand(seed, shape=(3, 4, 4, 2)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _t(a):
    return torch.tensor(np.asarray(a))


def test_dm_loss_and_its_gradient_match_the_official_code():
    x, real, fake = _rand(0), _rand(1), _rand(2)
    real[1, 0, 0, 0] = np.nan  # nan_to_num: a NaN in the direction becomes 0
    # sd_guidance.compute_distribution_matching_loss, transcribed (channels last: the means are over all but the batch)
    xt = _t(x).requires_grad_(True)
    p_real, p_fake = xt.detach() - _t(real), xt.detach() - _t(fake)
    grad = torch.nan_to_num((p_real - p_fake) / torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True))
    want = 0.5 * torch.nn.functional.mse_loss(xt, (xt - grad).detach(), reduction="mean")
    want.backward()
    loss_fn = lambda xx: dmd2.dm_loss(xx, dmd2.dm_gradient(xx, real, fake))  # noqa: E731
    loss, g = jax.value_and_grad(loss_fn)(jnp.asarray(x))
    np.testing.assert_allclose(float(loss), float(want.detach()), atol=ATOL)
    np.testing.assert_allclose(np.asarray(g), xt.grad.numpy(), atol=ATOL)
    # row 1's mean|p_real| is NaN: the official nan_to_num zeroes that whole row of the direction
    assert not np.any(np.asarray(dmd2.dm_gradient(x, real, fake))[1]) and np.all(np.isfinite(np.asarray(g)))


def test_fake_score_and_gan_losses_match_the_official_code():
    eps, noise = _rand(3), _rand(4)
    want = torch.mean((_t(eps) - _t(noise)) ** 2)
    np.testing.assert_allclose(float(dmd2.fake_score_loss(eps, noise)), float(want), atol=ATOL)
    real, fake = _rand(5, (6,)) * 3, _rand(6, (6,)) * 3
    sp = torch.nn.functional.softplus
    d_want = sp(_t(fake)).mean() + sp(-_t(real)).mean()  # compute_guidance_clean_cls_loss
    np.testing.assert_allclose(float(dmd2.discriminator_loss(real, fake)), float(d_want), atol=ATOL)
    np.testing.assert_allclose(float(dmd2.generator_gan_loss(fake)), float(sp(-_t(fake)).mean()), atol=ATOL)


def test_student_timesteps_are_the_official_list():
    for k in (1, 2, 4, 5, 8, 10):
        official = list(range(1000 - 1, 0, -(1000 // k)))  # sd_unified_model.denoising_step_list
        assert dmd2.denoising_timesteps(k).tolist() == official
    assert dmd2.denoising_timesteps(4).tolist() == [999, 749, 499, 249]
    with pytest.raises(UserError, match="divisor"):
        dmd2.denoising_timesteps(3)


def _zero_eps_model():
    """A teacher wrapper whose UNet predicts ε = 0: x̂0 = x / α_t."""
    return teacher_lib.Teacher(lambda p, x, t, c: jnp.zeros_like(x), dict(SCHED))


def test_backward_simulation_runs_the_selected_steps_then_renoises():
    model = _zero_eps_model()
    z = jnp.asarray(_rand(7, (2, 4, 4, 2)))
    ts = dmd2.denoising_timesteps(4)
    key = jax.random.PRNGKey(3)
    a = np.sqrt(ACP).astype(np.float32)
    s = np.sqrt(1 - ACP).astype(np.float32)
    x, t = dmd2.student_input(model, {}, z, None, ts, 0, key)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(z))  # step 0: pure noise at T - 1
    assert np.asarray(t).tolist() == [999.0, 999.0]
    x, t = dmd2.student_input(model, {}, z, None, ts, jnp.int32(2), key)
    assert np.asarray(t).tolist() == [499.0, 499.0]
    # transcription of sample_backward + prepare_denoising_data with the same noise draws
    k_loop, k_last = jax.random.split(key)
    x0 = np.asarray(z) / a[999]
    x1 = a[749] * x0 + s[749] * np.asarray(jax.random.normal(jax.random.fold_in(k_loop, 0), z.shape))
    x0 = x1 / a[749]  # the second step's x̂0 (its re-noising to 499 is discarded by the official code)
    want = a[499] * x0 + s[499] * np.asarray(jax.random.normal(k_last, z.shape))
    np.testing.assert_allclose(np.asarray(x), want, rtol=1e-4, atol=1e-4)


def test_sampler_is_x0_then_fresh_noise():
    model = _zero_eps_model()
    z = jnp.asarray(_rand(8, (2, 4, 4, 2)))
    key = jax.random.PRNGKey(5)
    a = np.sqrt(ACP).astype(np.float32)
    s = np.sqrt(1 - ACP).astype(np.float32)
    one = dmd2.sample_latents(model, {}, z, None, [999], key)
    np.testing.assert_allclose(np.asarray(one), np.asarray(z) / a[999], rtol=1e-5)
    two = dmd2.sample_latents(model, {}, z, None, [999, 499], key)
    x1 = a[499] * (np.asarray(z) / a[999]) + s[499] * np.asarray(jax.random.normal(jax.random.fold_in(key, 0), z.shape))
    np.testing.assert_allclose(np.asarray(two), x1 / a[499], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,convs", [(8, 3), (2, 2), (32, 5)])
def test_gan_head_reduces_any_bottleneck_to_one_logit(size, convs):
    feats = jnp.ones((3, size, size, 16))
    params = dmd2.GANHead().init(jax.random.PRNGKey(0), feats)["params"]
    assert dmd2.GANHead().apply({"params": params}, feats).shape == (3,)
    assert sum(k.startswith("Conv") for k in params) == convs  # stride-2 convs to <= 4x4, one to 1x1, the logit


def test_dmd2_command_gan_four_steps_samples_through_its_pipeline(tiny_teacher, tmp_path):  # noqa: F811
    # (kill + resume of `jaxdiff distill` is tested on SiD's smoke run: the same runner and checkpoints)
    out = tmp_path / "run"
    argv = ["distill", "--config", "configs/distill/dmd2.py:smoke,gan,4step", f"--config.teacher={tiny_teacher}"]
    assert cli.main(argv + ["--config.eval.student_steps=(4,)", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["steps"] == 3 and report["dmd2"]["num_steps"] == 4
    last = report["train"]["last"]
    for key in ("loss_fake_score", "loss_generator", "loss_d_fake_score", "loss_gan_generator", "loss_dm_generator"):
        assert np.isfinite(last[key]), key
    assert last["ok"] == 1.0
    assert [r["sampler"] for r in report["rows"]] == ["teacher DDIM 1", "dmd2 student 4"]

    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline(out / "model")
    sched = json.loads((out / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["original_inference_steps"] == 4
    assert json.loads((out / "model" / "sampling_defaults.json").read_text())["steps"] == 4
    z = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    prompts = ["a red circle", "a blue square"]
    # one step: both are x̂0 of pure noise at t = 999 (LCM's c_skip there is ~2.5e-8)
    mine = dmd2.sample(pipe, pipe.unet.params, prompts, z, 1, 4)
    np.testing.assert_allclose(pipe(prompts, steps=1, guidance=1.0, latents=z), mine, atol=1e-4)
    with pytest.raises(UserError, match="divisor"):
        dmd2.sample(pipe, pipe.unet.params, prompts, z, 3, 4)


def test_sfd_override_reaches_only_the_teachers_context_on_forget_rows():
    from jaxdiff.config import load_config
    from jaxdiff.distill import sid

    config = load_config("configs/distill/dmd2.py:smoke,sfd")
    prompts = ["a red circle", "a blue square", "a green disc", "a yellow triangle"]
    forget, index, teacher_prompts = sid.prompt_pools(prompts, config.sfd)
    assert teacher_prompts == ["a red square", "a blue square", "a green square", "a yellow triangle"]
    contexts = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 3), np.float32)
    teacher_ctx = contexts + 10 * forget[:, None, None]
    batch = dmd2.batch_function(config, contexts, None, teacher_ctx, index)(0)
    b = int(config.train.batch_size)
    assert batch["gen_context"].shape[0] == 2 * b  # SFD's forget batch: train.batch_size more rows of forget prompts
    rows = batch["gen_context"][:, 0, 0].astype(int)
    np.testing.assert_array_equal(batch["gen_teacher_context"][:, 0, 0], rows + 10 * forget[rows])
    assert forget[rows[b:]].all()


def _linear_unet(params, x, t, ctx):
    """A stand-in UNet: a per-channel scale of x plus the prompt's mean and a time term."""
    return params["w"] * x + jnp.mean(ctx, axis=(1, 2))[:, None, None, None] + 1e-3 * t[:, None, None, None]


def test_flow_generator_is_instaflows_one_step_and_regression_adds_dmds_term():
    from jaxdiff.distill import rectified_flow as rf

    params = {"w": jnp.asarray([0.5, -0.25], jnp.float32)}
    z, ctx = _rand(0), _rand(1, (3, 2, 5))
    # InstaFlow's one-step sample at t = 0: x̂1 = z0 + v_RF(z0), v_RF = −(the UNet output at time 1000)
    out = _linear_unet(params, z, rf.unet_timestep(jnp.zeros((3,))), ctx)
    expected = rf.extrapolate(z, jnp.zeros((3,)), rf.rf_velocity_of(out))
    np.testing.assert_allclose(dmd2.flow_generate(_linear_unet, params, z, ctx), expected, atol=1e-6)

    settings = dict(dmd2_config_block(), latent_shape=(4, 4, 2), generator="flow", real_guidance=1.0)
    batch = {"gen_context": ctx, "gen_teacher_context": ctx, "context": ctx}
    batch |= {"pair_z0": _rand(2), "pair_z1": _rand(3), "pair_context": _rand(4, (3, 2, 5))}
    all_params = {"unet": params, "fake_score": {"unet": {"w": jnp.asarray([0.4, 0.1], jnp.float32)}}}
    frozen = {"teacher": {"w": jnp.asarray([0.3, 0.2], jnp.float32)}, "uncond": jnp.zeros((1, 2, 5))}
    rng = jax.random.PRNGKey(0)
    _, plain = dmd2.make_losses(_linear_unet, None, SCHED, settings)
    _, with_reg = dmd2.make_losses(_linear_unet, None, SCHED, settings | {"regression_weight": 0.25})
    (l0, aux0), (l1, aux1) = plain(all_params, frozen, batch, rng), with_reg(all_params, frozen, batch, rng)
    x_reg = np.asarray(_linear_unet(params, batch["pair_z0"], jnp.full((3,), 1000.0), batch["pair_context"]))
    x_reg = batch["pair_z0"] - x_reg
    reg = np.mean(np.mean(np.reshape((x_reg - batch["pair_z1"]) ** 2, (3, -1)), axis=1))
    np.testing.assert_allclose(aux1["loss_reg"], reg, rtol=1e-5)
    np.testing.assert_allclose(l1 - l0, 0.25 * reg, rtol=1e-4, atol=1e-6)
    assert "loss_reg" not in aux0
    with pytest.raises(UserError, match="num_steps=1"):
        dmd2.make_losses(_linear_unet, None, SCHED, settings | {"num_steps": 4})
    with pytest.raises(UserError, match="dmd2.generator"):
        dmd2.make_losses(_linear_unet, None, SCHED, settings | {"generator": "gan"})


def dmd2_config_block():
    from jaxdiff.config import load_config

    return dict(load_config("configs/distill/dmd2.py").dmd2)


def test_dmd_command_refines_a_flow_student_from_teacher_pairs(tiny_teacher, tmp_path):  # noqa: F811
    from jaxdiff.config import load_config
    from jaxdiff.distill import run as run_lib
    from jaxdiff.sampling.pipeline import load_pipeline

    teacher = load_pipeline(tiny_teacher)
    run_lib.save_student(teacher, teacher.unet.params, tmp_path / "insta", 1)  # a stand-in InstaFlow student
    config = load_config("configs/distill/dmd2.py:smoke,dmd")
    config.teacher = str(tiny_teacher)
    config.pairs.update(num_pairs=4, shard_size=2, steps=2)
    config.eval.student_steps = (1,)
    with pytest.raises(UserError, match="generator=flow needs config.init"):  # init "teacher" is no flow student
        run_lib.distill(config, tmp_path / "wrong", progress=False)
    assert not (tmp_path / "wrong").exists()

    config.init = str(tmp_path / "insta" / "model")
    no_pairs = load_config("configs/distill/dmd2.py:smoke")
    no_pairs.update(teacher=str(tiny_teacher), init=config.init)
    no_pairs.dmd2.update(generator="flow", regression_weight=0.25)
    with pytest.raises(UserError, match="needs teacher pairs"):
        run_lib.distill(no_pairs, tmp_path / "no_pairs", progress=False)
    no_pairs.dmd2.update(regression_weight=0.0, gan_weight_g=0.1, gan_weight_d=1.0, gan_real="pairs")
    with pytest.raises(UserError, match="gan_real=pairs needs teacher pairs"):
        run_lib.distill(no_pairs, tmp_path / "no_pairs", progress=False)
    assert not (tmp_path / "no_pairs").exists()
    report = run_lib.distill(config, tmp_path / "run", progress=False)
    assert report["dmd2"]["generator"] == "flow" and report["dmd2"]["regression_weight"] == 0.25
    last = report["train"]["last"]
    assert np.isfinite(last["loss_reg_generator"]) and last["loss_reg_generator"] > 0 and last["ok"] == 1.0
    sched = json.loads((tmp_path / "run" / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert len(list((tmp_path / "run" / "pairs").glob("*.npz"))) == 2  # the teacher's pairs, 2 shards of 2


def test_gan_real_pairs_takes_the_teachers_pair_latents_with_their_prompts():
    # LADD's real data (dmd2.gan_real=pairs): the head's real logits come from "pair_z1" under "pair_context";
    # "real" (renders) is then unread. Clean images (gan_max_timestep 0) keep the logits deterministic.
    unet = {"w": jnp.asarray([0.4, 0.1], jnp.float32)}
    ctx = _rand(1, (3, 2, 5))
    feats = lambda p, x, t, c: jnp.tile(_linear_unet(p, x, t, c), (1, 1, 1, 32))  # noqa: E731  (64 channels: 2 a group)
    head = dmd2.init_head(feats, unet, (4, 4, 2), ctx)
    leaves, tree = jax.tree_util.tree_flatten(head)  # random weights everywhere (the logit layer starts at zero)
    head = tree.unflatten([0.5 * _rand(10 + i, np.shape(a)) for i, a in enumerate(leaves)])
    params = {"unet": {"w": jnp.asarray([0.5, -0.25], jnp.float32)}, "fake_score": {"unet": unet, "head": head}}
    frozen = {"teacher": unet, "uncond": jnp.zeros((1, 2, 5))}
    batch = {"context": ctx, "real": _rand(5), "pair_z1": _rand(3), "pair_context": _rand(4, (3, 2, 5))}
    settings = dict(dmd2_config_block(), latent_shape=(4, 4, 2), generator="flow", dm_weight=0.0)
    settings |= {"gan_weight_g": 0.1, "gan_weight_d": 1.0, "gan_max_timestep": 0}

    def p_real(batch, source):
        fake_loss, _ = dmd2.make_losses(_linear_unet, feats, SCHED, settings | {"gan_real": source})
        return float(fake_loss(params, frozen, batch, jax.random.PRNGKey(0))[1]["p_real"])

    base = p_real(batch, "pairs")
    assert p_real(batch | {"real": _rand(6)}, "pairs") == base
    assert abs(p_real(batch | {"pair_z1": 3 * _rand(7)}, "pairs") - base) > 1e-4
    assert abs(p_real(batch | {"pair_context": 3 * _rand(8, (3, 2, 5))}, "pairs") - base) > 1e-4
    images = p_real(batch, "images")  # the default reads "real" under the phase's own prompts
    assert abs(p_real(batch | {"real": 3 * _rand(6)}, "images") - images) > 1e-4
    with pytest.raises(UserError, match="dmd2.gan_real"):
        dmd2.make_losses(_linear_unet, feats, SCHED, settings | {"gan_real": "renders"})
