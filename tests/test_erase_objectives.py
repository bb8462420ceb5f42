"""Every erasure fine-tuning objective on a tiny UNet: a finite scalar loss, finite aux values and finite, non-zero
gradients with the structure of the trainable leaves (one compile per objective, so its own file)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_erase_losses import LATENT, TINY_UNET, _assert_finite_grads, _ctx, fast_jit

from jaxdiff import selectors
from jaxdiff.erase import ablation, all_but_one, doco, esd, spm, trce
from jaxdiff.models import unet
from jaxdiff.models.model import create


def tiny_unet():
    model = create(unet.ARCHITECTURES["UNet2DConditionModel"], TINY_UNET, abstract=True, attention="einsum")
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * 0.3), model.params
    )
    return model, params


@pytest.fixture(scope="module")
def tiny():
    return tiny_unet()


def _objective(name, model, params):
    b = 1
    c, u, alt = _ctx(10, b), _ctx(11, b), _ctx(12, b)
    lat = jnp.asarray(np.random.default_rng(13).standard_normal((b, *LATENT)).astype(np.float32))
    if name == "esd":
        loss = esd.make_loss(model, ddim_steps=3, latent_shape=LATENT)
        return loss, selectors.split(params, "esd-x")[0], {"cond": c, "uncond": u}
    if name == "doco":
        method = doco.DoCo(model, disc_channels=(8, 16))
        disc = method.init_disc(jax.random.PRNGKey(0), LATENT)

        def loss(trainable, frozen, batch, rng):  # both UNet gradients of DoCo (adversarial, prior) and surgery
            frozen = {**frozen, "disc": disc}
            (l_adv, _), (l_prior, _) = (
                method.adv_loss(trainable, frozen, batch, rng),
                method.prior_loss(trainable, frozen, batch, rng),
            )
            return l_adv + l_prior, {"adv": l_adv, "prior": l_prior}

        batch = {"latents": lat, "target": c, "anchor": alt, "prior_latents": lat, "prior": alt}
        return loss, selectors.split(params, "cross-attn-kv")[0], batch
    if name == "spm":
        loss = spm.make_loss(model, max_denoising_steps=3, latent_shape=LATENT, num_anchors=2)
        ads = spm.init_adapters(params, jax.random.PRNGKey(0))
        return loss, ads, {"target": c, "positive": c, "surrogate": u, "uncond": u}
    if name == "trce":
        loss = trce.make_stage2_loss(model)
        batch = {
            "x": lat,
            "t": jnp.array([801]),
            "safe": alt,
            "neg": c,
            "uncond": u,
            "x_u": jnp.concatenate([lat, 0.5 * lat]),
            "t_u": jnp.array([100, 900]),
            "uncond_u": jnp.concatenate([u, u]),
        }
        return loss, selectors.split(params, "trce")[0], batch
    if name == "all_but_one":
        loss = all_but_one.make_loss(model, ddim_steps=3, latent_shape=LATENT)
        return loss, selectors.split(params, "xattn")[0], {"cond": c, "alt": u, "uncond": u}
    if name == "ablation":
        loss = ablation.make_loss(model)
        batch = {"latents": lat, "target": c, "anchor": alt, "prior_latents": lat, "prior": alt}
        return loss, selectors.split(params, "cross-attn-kv")[0], batch
    raise KeyError(name)


def check_objective(tiny, name):
    model, params = tiny
    loss, trainable, batch = _objective(name, model, params)
    frozen = {"base": params, "reg": params} if name == "trce" else {"base": params}
    (value, aux), grads = fast_jit(jax.value_and_grad(loss, has_aux=True))(
        trainable, frozen, batch, jax.random.PRNGKey(3)
    )
    assert value.shape == () and np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree_util.tree_leaves(aux))
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    _assert_finite_grads(grads)


# The objectives that sample x_t in a loop; trce, doco and ablation are in test_erase_objectives_data.py (the
# compiles are split over two files to keep each under a minute on a shared CPU).
@pytest.mark.parametrize("name", ["esd", "spm", "all_but_one"])
def test_objective_gives_a_finite_scalar_and_finite_gradients(tiny, name):
    check_objective(tiny, name)
