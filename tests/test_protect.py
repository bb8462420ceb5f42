"""Diff-Protect PGD (jaxdiff.protect): the budget holds after every projection, the SDS step is exactly the encoder's
VJP of ε̂ − ε (no UNet Jacobian, unlike AdvDM), sign conventions, zero steps, bad input; `jaxdiff protect` end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_erase_losses import TINY_UNET, fast_jit

from jaxdiff import cli
from jaxdiff.errors import UserError
from jaxdiff.models import unet, vae
from jaxdiff.models.model import create
from jaxdiff.protect import pgd
from jaxdiff.train.objectives import alphas_cumprod

D, L = TINY_UNET["cross_attention_dim"], 6
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)  # 16x16 images -> 8x8x4 latents, the tiny UNet's sample size


def _random(model, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * scale), model.params
    )


def tiny_world():
    """(Target, params, x0 [2, 16, 16, 3] in [−1, 1], context [2, L, D], keys [2])."""
    v = create(vae.ARCHITECTURES["AutoencoderKL"], TINY_VAE, abstract=True, attention="einsum")
    u = create(unet.ARCHITECTURES["UNet2DConditionModel"], TINY_UNET, abstract=True, attention="einsum")
    target = pgd.Target(
        encode=v.encode,
        eps=lambda p, z, t, c: u.apply(p, z, t.astype(jnp.float32), c),
        alphas_cumprod=np.asarray(alphas_cumprod(), np.float32),  # SD's scaled-linear 1000 steps
        scaling_factor=0.5,
    )
    params = {"vae": _random(v, 0, 0.2), "unet": _random(u, 1)}
    # A trained VAE's posterior is narrow (logvar far below 0); random weights give σ ≈ 1, where a posterior sample
    # is mostly noise. The quant conv's logvar biases make the tiny posterior narrow too.
    bias = params["vae"]["quant_conv"]["bias"]
    params["vae"]["quant_conv"]["bias"] = bias.at[4:].set(-8.0)
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32))
    x0 = x0.at[:, :4].set(1.0).at[:, 4:8].set(-1.0)  # saturated pixels: the [−1, 1] clip must hold too
    context = jnp.asarray(rng.standard_normal((2, L, D)).astype(np.float32))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(2))
    return target, params, x0, context, keys


@pytest.fixture(scope="module")
def tiny():
    return tiny_world()


def _run(tiny, **kw):
    target, params, x0, context, keys = tiny
    cfg = pgd.ProtectConfig(**kw)
    x_target = pgd.default_target(16, 16)[None] if cfg.mode in pgd.TARGET_MODES else None
    return np.asarray(pgd.compiled(cfg, target)(params, x0, context, keys, x_target))


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_budget_and_range_hold_after_every_projection(tiny, steps):
    x0 = np.asarray(tiny[2])
    eps = 3 / 255
    x = _run(tiny, mode="sds-", eps=eps, alpha=2 / 255, steps=steps)
    delta = np.abs(x - x0)
    assert delta.max() <= 2 * eps + 1e-6  # [0, 1] budget, doubled on the [−1, 1] scale
    assert x.min() >= -1.0 and x.max() <= 1.0
    # The projection binds: after 2+ steps of 4/255 (doubled) some pixels sit exactly on the budget's edge.
    assert np.isclose(delta, 2 * eps, atol=1e-6).any() == (steps >= 2)
    assert np.all(x[:, :4] <= 1.0) and np.all(x[:, 4:8] >= -1.0)


@pytest.mark.parametrize("mode", ["sdst-", "sdst+", "advdm", "photoguard", "mist"])
def test_every_mode_moves_within_the_budget(tiny, mode):
    x0 = np.asarray(tiny[2])
    x = _run(tiny, mode=mode, eps=2 / 255, alpha=1 / 255, steps=3)
    delta = np.abs(x - x0)
    assert 0 < delta.max() <= 4 / 255 + 1e-6 and x.min() >= -1.0 and x.max() <= 1.0


def test_project_clips_to_ball_then_range():
    x0 = jnp.asarray([-0.99, 0.0, 0.99])
    x = jnp.asarray([-2.0, 0.5, 2.0])
    np.testing.assert_allclose(pgd.project(x, x0, 0.1), [-1.0, 0.1, 1.0])


def test_sds_step_is_the_encoder_vjp_of_eps_hat_minus_eps(tiny):
    """For fixed t, ε and posterior noise, <g_x, u> = <ε̂ − ε, (∂z/∂x) u> for random directions u, the right side by
    forward-mode JVPs of the encoder alone (a computation independent of the VJP); AdvDM's gradient, which goes
    through the UNet, fails the same identity."""
    target, params, x0, context, _ = tiny
    rng = np.random.default_rng(5)
    t = jnp.asarray([250, 700])
    noise = jnp.asarray(rng.standard_normal((2, 8, 8, 4)).astype(np.float32))
    post = jnp.asarray(rng.standard_normal((2, 8, 8, 4)).astype(np.float32))
    dirs = jnp.asarray(rng.standard_normal((6, *x0.shape)).astype(np.float32))

    @fast_jit
    def check(params, x0, context, t, noise, post, dirs):
        def z_of(x):  # z = (mean + σ·n)·scaling_factor, written out here
            mean, logvar = target.encode(params["vae"], x)
            return (mean + jnp.exp(0.5 * logvar) * post) * target.scaling_factor

        z = z_of(x0)
        acp = jnp.asarray(target.alphas_cumprod)[t][:, None, None, None]
        eps_hat = target.eps(params["unet"], jnp.sqrt(acp) * z + jnp.sqrt(1 - acp) * noise, t, context)
        ju = jax.vmap(lambda u: jax.jvp(z_of, (x0,), (u,))[1])(dirs)
        by_hand = jnp.einsum("bhwc,kbhwc->k", eps_hat - noise, ju)
        g = pgd.sds_gradient(target, params, x0, context, t, noise, post)
        adv = jax.grad(pgd.semantic_loss, argnums=2)(target, params, x0, context, t, noise, post)
        n = eps_hat.size  # L_S is a mean: its gradient carries 2/N
        return by_hand, jnp.einsum("bhwc,kbhwc->k", g, dirs), jnp.einsum("bhwc,kbhwc->k", adv * n / 2, dirs)

    by_hand, sds, adv = map(np.asarray, check(params, x0, context, t, noise, post, dirs))
    np.testing.assert_allclose(sds, by_hand, rtol=1e-4, atol=1e-4 * np.abs(by_hand).max())
    assert np.abs(adv - by_hand).max() > 0.05 * np.abs(by_hand).max()  # the UNet Jacobian changes the gradient


@pytest.mark.parametrize("mode,sign", [("sds-", -1.0), ("sds+", 1.0)])
def test_sds_sign_conventions(tiny, mode, sign):
    """One step from x0 (no clipping: a wide budget, mid-range pixels) moves by sign·α·sign(g_x) of that step's
    draws: sds− descends the semantic loss, sds+ ascends it."""
    target, params, x0, context, keys = tiny
    x = _run(tiny, mode=mode, eps=0.5, alpha=1 / 255, steps=1)

    @jax.jit
    def first_gradient(params, x0, context, keys):
        return pgd.sds_gradient(target, params, x0, context, *pgd._draws(target, keys, 0, (8, 8, 4)))

    g = np.asarray(first_gradient(params, x0, context, keys))
    expected = np.clip(np.asarray(x0) + sign * 2 / 255 * np.sign(g), -1, 1)
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert np.abs(x - np.asarray(x0)).max() > 0


def test_zero_steps_is_the_identity(tiny):
    x = _run(tiny, mode="sds-", steps=0)
    assert np.array_equal(x, np.asarray(tiny[2]))


def test_photoguard_moves_the_latent_towards_the_target(tiny):
    target, params, x0, _, _ = tiny
    x = _run(tiny, mode="photoguard", eps=16 / 255, alpha=2 / 255, steps=10)
    zt = pgd.latent(target, params["vae"], jnp.asarray(pgd.default_target(16, 16))[None], 0.0)

    def dist(v):
        return float(jnp.sum(jnp.square(pgd.latent(target, params["vae"], jnp.asarray(v), 0.0) - zt)))

    rnd = np.clip(np.asarray(x0) + 32 / 255 * np.sign(np.random.default_rng(0).standard_normal(x0.shape)), -1, 1)
    assert dist(x) < 0.8 * dist(x0) and dist(x) < 0.8 * dist(rnd)


def test_target_modes_need_a_target(tiny):
    target, params, x0, context, keys = tiny
    with pytest.raises(UserError, match="needs a target"):
        pgd.pgd(pgd.ProtectConfig(mode="photoguard", steps=1), target, params, x0, context, keys, None)


@pytest.mark.parametrize(
    "kw,match",
    [({"mode": "sds"}, "unknown protection mode"), ({"eps": -0.1}, "eps must"), ({"steps": -1}, "steps must")],
)
def test_bad_config_is_a_user_error(kw, match):
    with pytest.raises(UserError, match=match):
        pgd.ProtectConfig(**kw)


def _one_line_error(capsys, argv, match):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("jaxdiff: error: ") and err.count("\n") == 1 and match in err, err


def test_cli_errors_on_an_empty_folder_and_mixed_sizes(tmp_path, capsys):
    from jaxdiff.images import save_png

    empty, mixed, out = tmp_path / "empty", tmp_path / "mixed", tmp_path / "out"
    empty.mkdir()
    _one_line_error(capsys, ["protect", "--images", str(empty), "--out", str(out)], "no images")
    save_png(mixed / "a.png", np.zeros((32, 32, 3), np.uint8))
    save_png(mixed / "b.png", np.zeros((16, 16, 3), np.uint8))
    _one_line_error(capsys, ["protect", "--images", str(mixed), "--out", str(out)], "different sizes")
    assert not out.exists()  # nothing written


def test_cli_protects_a_folder_within_budget(tmp_path, capsys):
    """`jaxdiff protect` on the shapes model (PhotoGuard: encoder only, the cheapest to compile): PNGs of the same
    size, within ε after uint8 rounding, not all unchanged; protect.json records the settings."""
    from jaxdiff.data import shapes as S
    from jaxdiff.images import read_image, save_png

    rng = np.random.default_rng(0)
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        save_png(src / f"{i}.png", S.render(S.sample_scene(rng, num_objects=1)))
    argv = ["protect", "--images", str(src), "--out", str(out), "--mode", "photoguard", "--eps", "4"]
    assert cli.main(argv + ["--steps", "3", "--no-progress"]) == 0, capsys.readouterr().err
    for i in range(2):
        a, b = read_image(src / f"{i}.png").astype(int), read_image(out / f"{i}.png").astype(int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 4 and np.abs(a - b).max() > 0
    assert json.loads((out / "protect.json").read_text())["mode"] == "photoguard"
