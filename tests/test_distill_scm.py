"""sCM: the TrigFlow <-> VP map against an oracle teacher, jax.jvp's tangent against finite differences, the tangent
and the weighted loss against a PyTorch transcription of FastGen's `_scm_pred_to_loss`, and the command."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_distill_sid import ACP, SCHED, tiny_teacher  # noqa: F401  (tiny_teacher is a fixture)

from jaxdiff import cli
from jaxdiff.distill import scm
from jaxdiff.distill import teacher as teacher_lib

torch = pytest.importorskip("torch")
SD = 0.7  # σ_d ≠ 1, so that a misplaced σ_d shows


def _rand(seed, shape=(3, 4, 4, 2)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _oracle(x0):
    """A VP 'UNet' that knows x0: its ε prediction at (x, t) is exactly (x − α_t x0) / σ_t."""
    model = teacher_lib.Teacher(None, dict(SCHED))

    def unet(params, x, t, context):
        alpha, sigma = model.alpha_sigma(t)
        return (x - alpha[:, None, None, None] * x0) / sigma[:, None, None, None]

    return teacher_lib.Teacher(unet, dict(SCHED))


def test_trigflow_velocity_of_an_oracle_vp_model_is_the_true_one():
    x0, eps = jnp.asarray(_rand(0)), jnp.asarray(_rand(1))
    t_hat = jnp.asarray([0.2, 0.8, 1.4], jnp.float32)
    c, s = (f(t_hat)[:, None, None, None] for f in (jnp.cos, jnp.sin))
    x_hat = c * x0 + s * SD * eps
    F = scm.trig_flow(_oracle(x0), {}, x_hat, t_hat, None, SD, jnp.asarray(ACP, jnp.float32))
    np.testing.assert_allclose(F * SD, -s * x0 + c * SD * eps, atol=2e-4)  # dx̂/dt = −sin t̂ x0 + cos t̂ z
    # the VP point has the same noise: x_vp = α x0 + σ ε at the matched timestep
    x_vp, timestep = scm.vp_input(jnp.asarray(ACP, jnp.float32), x_hat, t_hat, SD)
    a = np.interp(np.asarray(timestep), np.arange(1000), ACP)
    want = np.sqrt(a)[:, None, None, None] * x0 + np.sqrt(1 - a)[:, None, None, None] * eps
    np.testing.assert_allclose(x_vp, want, atol=2e-4)


def test_jvp_tangent_matches_finite_differences_along_the_ode():
    x0, eps = jnp.asarray(_rand(2)), jnp.asarray(_rand(3))
    model = teacher_lib.Teacher(lambda p, x, t, c: jnp.tanh(x * p["w"]) + 1e-3 * t[:, None, None, None], dict(SCHED))
    acp = jnp.asarray(ACP, jnp.float32)
    F = lambda x, t: scm.trig_flow(model, {"w": 0.7}, x, t, None, SD, acp)  # noqa: E731
    t_hat = jnp.asarray([0.3, 0.7, 1.1], jnp.float32)
    x_hat = jnp.cos(t_hat)[:, None, None, None] * x0 + jnp.sin(t_hat)[:, None, None, None] * SD * eps
    dx = -jnp.sin(t_hat)[:, None, None, None] * x0 + jnp.cos(t_hat)[:, None, None, None] * SD * eps
    _, jvp = jax.jvp(F, (x_hat, t_hat), (dx, jnp.ones_like(t_hat)))
    h = 1e-3  # central difference of F along the true path x̂(t) = cos t x0 + sin t σ_d ε
    path = lambda t: jnp.cos(t)[:, None, None, None] * x0 + jnp.sin(t)[:, None, None, None] * SD * eps  # noqa: E731
    fd = (F(path(t_hat + h), t_hat + h) - F(path(t_hat - h), t_hat - h)) / (2 * h)
    np.testing.assert_allclose(jvp, fd, rtol=2e-2, atol=2e-2)  # float32 differences at h = 1e-3


def test_tangent_and_weighted_loss_match_fastgen():
    F, F_minus, F_jvp, x_hat, dxt = (_rand(i) for i in range(4, 9))
    t_hat, logvar, r = np.array([0.2, 0.9, 1.3], np.float32), np.array([0.1, -0.3, 0.5], np.float32), 0.4
    # FastGen `_scm_pred_to_loss` (trig schedule: alpha = cos, sigma = sin; D = 1, no prior weighting), transcribed
    T = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    a, s = torch.cos(T(t_hat)).view(-1, 1, 1, 1), torch.sin(T(t_hat)).view(-1, 1, 1, 1)
    g = -a * a * (SD * T(F_minus) - T(dxt)) + r * (-(a * s * T(x_hat) + SD * T(F_jvp)))
    g = g / (torch.linalg.vector_norm(g, dim=(1, 2, 3), keepdim=True) + 0.1)
    unweighted = torch.mean(torch.square(T(F) - T(F_minus) - g), dim=(1, 2, 3))
    want = 1.0 / torch.exp(T(logvar)) * unweighted + T(logvar)
    mine_g = scm.tangent(F_minus, F_jvp, x_hat, dxt, t_hat, SD, r, 0.1)
    np.testing.assert_allclose(mine_g, g.numpy(), atol=1e-5)
    rows, _ = scm.weighted_loss(jnp.asarray(F), jnp.asarray(F_minus), mine_g, jnp.asarray(logvar))
    np.testing.assert_allclose(rows, want.numpy(), rtol=1e-5)


def test_rcm_command_writes_a_two_step_student(tiny_teacher, tmp_path):  # noqa: F811
    # rCM = the sCM phase + DMD2's fake score and term: one run covers both (pure sCM is the same phase, dmd_weight 0)
    out = tmp_path / "run"
    argv = ["distill", "--config", "configs/distill/scm.py:smoke,rcm", f"--config.teacher={tiny_teacher}"]
    assert cli.main(argv + ["--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    last = report["train"]["last"]
    assert report["train"]["steps"] == 3 and last["ok"] == 1.0
    for key in ("loss_student", "loss_scm_student", "loss_dmd_student", "loss_fake_score"):
        assert np.isfinite(last[key]), key
    assert 0 < last["warmup_student"] <= 1.0  # the tangent warm-up is on at step 2 of 2
    assert report["scm"]["dmd_weight"] == 1.0 and report["scm"]["dmd2"]["num_steps"] == 2
    assert [r["sampler"] for r in report["rows"]] == ["teacher DDIM 1", "scm student 2"]
    sched = json.loads((out / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["original_inference_steps"] == 2


def test_the_tangents_jvp_goes_through_a_kernel_attention_with_the_forward_mode_model():
    """Splash (and cuDNN) attention are custom-VJP kernels: `jax.jvp` through them fails when lowered (as sCM's
    SD1.5 step for TPU did). `Model.for_forward_mode` swaps in XLA's attention; its jvp equals plain attention's."""
    from jaxdiff.models import attention
    from jaxdiff.models.model import create
    from jaxdiff.models.registry import architecture_for

    assert [attention.forward_mode_safe(i, "tpu") for i in ("auto", "splash", "cudnn", "einsum")] == [
        "xla",
        "xla",
        "xla",
        "einsum",
    ]
    assert attention.forward_mode_safe("auto", "cpu") == "auto"  # CPU's auto picks chunked / einsum: plain JAX
    config = dict(
        _class_name="UNet2DConditionModel", sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    # 16x16 latents: 256 queries, a length the splash kernel takes (interpret mode on this CPU).
    kernel = create(architecture_for(config), config, abstract=False, attention="splash", platform="cpu")
    plain = kernel.with_module(attention="einsum")
    x, ctx = jnp.asarray(_rand(2, (2, 16, 16, 4))), jnp.asarray(_rand(3, (2, 4, 32)))
    t, dx, dt = jnp.asarray([300.0, 700.0]), jnp.asarray(_rand(4, (2, 16, 16, 4))), jnp.asarray([1.0, -2.0])

    def jvp(model):
        f = lambda x, t: model.apply(kernel.params, x, t, ctx)  # noqa: E731
        return jax.jit(lambda x, t, dx, dt: jax.jvp(f, (x, t), (dx, dt)))

    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jvp(kernel).lower(x, t, dx, dt)
    forward_mode = kernel.for_forward_mode()
    assert forward_mode.module.attention == "xla"
    got, want = jvp(forward_mode)(x, t, dx, dt), jvp(plain)(x, t, dx, dt)
    for a, b in zip(got, want):  # float32, same math in another order
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
