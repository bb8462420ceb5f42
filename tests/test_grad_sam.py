"""Grad-SAM editing: the exact attention Jacobian matches finite differences, latents outside the saliency mask are
the reference's bitwise, and the edit compiles once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_convert_io import tiny_pipeline

from jaxdiff.errors import UserError
from jaxdiff.models import attention_control as ac
from jaxdiff.sampling import grad_sam
from jaxdiff.sampling.cache import CachedUNet
from jaxdiff.sampling.pipeline import load_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(tiny_pipeline(tmp_path_factory.mktemp("gradsam") / "pipe"))


def test_attention_jacobian_equals_finite_differences(pipe):
    model = CachedUNet(pipe.unet.module, pipe.unet.params)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([400], jnp.int32)
    context, _ = pipe.encode_prompts(["a b c"])
    name = list(grad_sam.cross_layers(model, x, t, context))[-1]
    out, probs, grads = jax.jit(lambda x: grad_sam.attention_jacobian(model, x, t, context, [name]))(x)
    assert grads[name].shape == (8 * 8 * 4,) + probs[name].shape
    np.testing.assert_allclose(probs[name].sum(-1), 1.0, rtol=1e-5)

    @jax.jit
    def perturbed(delta):
        edit = lambda p, layer: p + delta if layer.name == name else p  # noqa: E731
        with ac.control(edit=edit, select=lambda layer: layer.name == name):
            return model(x, t, (context, None))

    g = np.asarray(grads[name])
    rng = np.random.default_rng(1)
    for e in rng.choice(g.shape[0], 4, replace=False):
        idx = np.unravel_index(np.argmax(np.abs(g[e])), g.shape[1:])  # the largest entry: above float32 noise
        eps = 1e-2
        delta = jnp.zeros(g.shape[1:]).at[idx].set(eps)
        fd = (np.asarray(perturbed(delta)).reshape(-1)[e] - np.asarray(perturbed(-delta)).reshape(-1)[e]) / (2 * eps)
        np.testing.assert_allclose(fd, g[e][idx], rtol=2e-2, atol=1e-4)
    # The one-hot VJPs are the full Jacobian: a random cotangent's VJP is their weighted sum.
    w = rng.standard_normal(g.shape[0]).astype(np.float32)
    _, vjp = jax.vjp(lambda d: perturbed(d), jnp.zeros(g.shape[1:]))
    np.testing.assert_allclose(vjp(jnp.asarray(w).reshape(out.shape))[0], np.tensordot(w, g, 1), rtol=1e-3, atol=1e-5)


def test_latents_outside_the_mask_are_the_reference_bitwise_and_it_compiles_once(pipe):
    rng = np.random.default_rng(2)
    reference = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    config = grad_sam.GradSAM(tokens=(2,), manipulate=(0.25, 0.5), strength=1.0, k=0.0)
    out, mask = grad_sam.edit(pipe, ["a b c", "a x c"], reference, config, steps=4, guidance=3.0, output="latents")
    assert 0 < mask.mean() < 1  # the saliency localises: some of the latent is kept, some edited
    np.testing.assert_array_equal(out[~mask], np.asarray(reference)[~mask])
    assert np.abs(out[mask] - np.asarray(reference)[mask]).max() > 1e-3
    other, _ = grad_sam.edit(pipe, ["a b c", "a x c"], reference * 0.5, config, steps=4, guidance=3.0, seed=5,
                             output="latents")  # fmt: skip
    assert np.abs(other - out).max() > 1e-3
    (program,) = [v for k, v in pipe._compiled.items() if k[0] == "grad_sam.edit"]
    assert program._cache_size() == 1


def test_saliency_mask_unions_subjects_and_intersects_layers():
    b, h, w, c, e = 1, 4, 4, 1, 16
    probs = {"l0": jnp.ones((b, 1, 4, 3)), "l1": jnp.ones((b, 1, 4, 3))}
    grads = {k: jnp.zeros((e, b, 1, 4, 3)) for k in probs}
    grads["l0"] = grads["l0"].at[0, ..., 1].set(1.0).at[5, ..., 2].set(1.0)  # subject 1 -> e=0, subject 2 -> e=5
    grads["l1"] = grads["l1"].at[0, ..., 1].set(1.0).at[15, ..., 2].set(-1.0)
    config = grad_sam.GradSAM(tokens=(1, 2), smooth=1)
    m = np.asarray(grad_sam.saliency_mask(config, (b, h, w, c), probs, grads)).reshape(-1)
    assert list(np.flatnonzero(m)) == [0]  # e=5 only in l0; e=15's gradient is negative (ReLU)
    m_abs = grad_sam.saliency_mask(dataclasses_replace(config, positive="abs"), (b, h, w, c), probs, grads)
    assert list(np.flatnonzero(np.asarray(m_abs).reshape(-1))) == [0]
    only_l0 = grad_sam.saliency_mask(config, (b, h, w, c), {"l0": probs["l0"]}, {"l0": grads["l0"]})
    assert list(np.flatnonzero(np.asarray(only_l0).reshape(-1))) == [0, 5]
    with pytest.raises(UserError, match="positive must be"):
        grad_sam.GradSAM(tokens=(1,), positive="square")


def dataclasses_replace(config, **kwargs):
    import dataclasses

    return dataclasses.replace(config, **kwargs)


def test_spatial_mask_is_one_mask_for_every_channel():
    b, h, w, c, e = 1, 2, 2, 2, 8
    probs = {"l0": jnp.ones((b, 1, 4, 2))}
    grads = {"l0": jnp.zeros((e, b, 1, 4, 2)).at[1, ..., 1].set(1.0)}  # element 1 = (0, 0, channel 1)
    per_channel = grad_sam.GradSAM(tokens=(1,), smooth=1)
    m = np.asarray(grad_sam.saliency_mask(per_channel, (b, h, w, c), probs, grads))
    assert m[0, 0, 0].tolist() == [False, True] and m.sum() == 1
    spatial = np.asarray(grad_sam.saliency_mask(dataclasses_replace(per_channel, spatial=True), m.shape, probs, grads))
    assert spatial[0, 0, 0].tolist() == [True, True] and spatial.sum() == 2
