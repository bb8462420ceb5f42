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


class _RetainJob:
    """What `finetune.with_retention` reads of a Job: the train block, the original UNet, its scheduler and data."""

    def __init__(self, model, params, weight):
        from jaxdiff.erase.config import base_config, train_block

        self.config = base_config("esd")
        self.config.train = train_block(steps=1, learning_rate=1e-3, batch_size=2)
        self.config.train.retain_weight = weight
        self.model, self.original = model, params
        self.pipe = type("Pipe", (), {"scheduler_config": None})()

    def retain_data(self, n):
        z = jnp.asarray(np.random.default_rng(21).standard_normal((n, *LATENT)).astype(np.float32))
        return z, jnp.concatenate([_ctx(22 + i, 1) for i in range(n)])


def test_retain_loss_is_zero_at_the_original_and_pulls_moved_leaves_back(tiny):
    from jaxdiff.erase import finetune

    model, params = tiny
    trainable, _ = selectors.split(params, "esd-x")
    base_loss = lambda p, frozen, batch, rng: (jnp.float32(0.0), {})  # noqa: E731
    job = _RetainJob(model, params, weight=2.0)
    loss, batches, frozen = finetune.with_retention(job, base_loss, lambda i: {}, params, {"base": params})
    assert list(frozen) == ["base"]  # the original is not put on the devices twice
    batch, rng = batches(0), jax.random.PRNGKey(0)
    assert batch["retain_latents"].shape == (2, *LATENT) and batch["retain"].shape[0] == 2
    value, aux = loss(trainable, frozen, batch, rng)
    assert float(value) == 0.0 and float(aux["retain"]) == 0.0  # θ = θ*: nothing to retain
    moved = jax.tree_util.tree_map(lambda x: x + 0.05, trainable)
    value, aux = loss(moved, frozen, batch, rng)
    assert float(value) == pytest.approx(2.0 * float(aux["retain"]), rel=1e-6) and float(aux["retain"]) > 0
    grads = jax.grad(lambda p: loss(p, frozen, batch, rng)[0])(moved)
    _assert_finite_grads(grads)
    # Weight 0 is the method as published: the loss and batches come back untouched.
    plain = _RetainJob(model, params, weight=0.0)
    assert finetune.with_retention(plain, base_loss, batches, params, {"base": params})[:2] == (base_loss, batches)
    with pytest.raises(Exception, match="must be >= 0"):
        finetune.with_retention(_RetainJob(model, params, -1.0), base_loss, batches, params, {"base": params})
