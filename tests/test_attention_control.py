"""Attention control: explicit probabilities equal the fast path, capture per layer, edits and gradients, and
step-dependent edits inside the compiled sampling loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_convert_io import tiny_pipeline

from jaxdiff.models import attention_control as ac
from jaxdiff.sampling import denoise, make_scheduler
from jaxdiff.sampling.cache import CachedUNet
from jaxdiff.sampling.pipeline import load_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(tiny_pipeline(tmp_path_factory.mktemp("attn") / "pipe"))


@pytest.fixture(scope="module")
def inputs(pipe):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    context, _ = pipe.encode_prompts(["a b c", "x y"])
    return x, jnp.asarray([500, 20], jnp.int32), context


def test_explicit_probabilities_equal_the_fast_path_and_are_captured_per_layer(pipe, inputs):
    unet = pipe.unet
    plain = unet.apply(unet.params, *inputs)
    out, maps = jax.jit(lambda p, *a: ac.apply_with_maps(unet, p, *a))(unet.params, *inputs)
    np.testing.assert_allclose(out, plain, atol=2e-5, rtol=0)  # float32 softmax either way; another op order
    # The tiny UNet: one transformer block at 8x8 (down) and at 8x8 in the up path (two layers), self + cross each.
    names = sorted(maps)
    assert names and all(n.endswith(("attn1", "attn2")) for n in names)
    assert len([n for n in names if n.endswith("attn2")]) == len([n for n in names if n.endswith("attn1")])
    for name, probs in maps.items():
        b, heads, queries, keys = probs.shape
        assert (b, heads) == (2, 4)
        assert keys == (queries if name.endswith("attn1") else inputs[2].shape[1])
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    side_map = ac.token_maps(maps, side=8, token=1)
    assert side_map.shape == (2, 8, 8) and np.all(np.isfinite(side_map))


def test_edits_change_the_output_only_where_selected_and_gradients_flow(pipe, inputs):
    unet = pipe.unet
    plain = unet.apply(unet.params, *inputs)

    def flatten_cross(probs, layer):  # all the weight on the start token
        return jax.nn.one_hot(jnp.zeros(probs.shape[:-1], jnp.int32), probs.shape[-1]) if layer.cross else probs

    edited, _ = ac.apply_with_maps(unet, unet.params, *inputs, edit=flatten_cross)
    assert np.max(np.abs(edited - plain)) > 1e-3  # 50x the bound of the equality above
    none_selected, maps = ac.apply_with_maps(
        unet, unet.params, *inputs, edit=flatten_cross, select=lambda layer: not layer.cross
    )
    np.testing.assert_allclose(none_selected, plain, atol=2e-5, rtol=0)
    assert maps and not any(n.endswith("attn2") for n in maps)  # only the selected layers ran explicitly

    def loss(context):  # how much the first image's 8x8 cross-attention looks at token 1
        _, maps = ac.apply_with_maps(unet, unet.params, inputs[0], inputs[1], context)
        return ac.token_maps(maps, side=8, token=1)[0].sum()

    grad = jax.grad(loss)(inputs[2])
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_step_dependent_edit_in_the_compiled_loop(pipe, inputs):
    sched = make_scheduler("ddim", pipe.scheduler_config)
    plan = sched.plan(6)
    model = CachedUNet(pipe.unet.module, pipe.unet.params)

    def run(threshold):
        def edit(probs, layer, t):  # prompt-to-prompt's window: flatten cross-attention while t > threshold
            flat = jax.nn.one_hot(jnp.zeros(probs.shape[:-1], jnp.int32), probs.shape[-1])
            on = (t > threshold)[:, None, None, None] & layer.cross
            return jnp.where(on, flat, probs)

        controlled = ac.Controlled(model, edit)
        fn = jax.jit(lambda x, c: denoise.denoise(controlled, sched, plan, x, (c, None)))
        return np.asarray(fn(inputs[0], inputs[2]))

    plain = np.asarray(jax.jit(lambda x, c: denoise.denoise(model, sched, plan, x, (c, None)))(inputs[0], inputs[2]))
    np.testing.assert_allclose(run(threshold=10_000), plain, atol=1e-4, rtol=0)  # never on: the plain loop
    some, always = run(threshold=500), run(threshold=-1)
    assert np.max(np.abs(always - plain)) > np.max(np.abs(some - plain)) > 1e-4
