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

    def run(until):
        def edit(probs, layer, step, num_steps):  # prompt-to-prompt's window: on for the first `until` steps
            flat = jax.nn.one_hot(jnp.zeros(probs.shape[:-1], jnp.int32), probs.shape[-1])
            return jnp.where((step < until) & layer.cross, flat, probs)

        controlled = ac.Controlled(model, edit, plan.timesteps)
        fn = jax.jit(lambda x, c: denoise.denoise(controlled, sched, plan, x, (c, None)))
        return np.asarray(fn(inputs[0], inputs[2]))

    plain = np.asarray(jax.jit(lambda x, c: denoise.denoise(model, sched, plan, x, (c, None)))(inputs[0], inputs[2]))
    np.testing.assert_allclose(run(until=0), plain, atol=1e-4, rtol=0)  # never on: the plain loop
    some, always = run(until=3), run(until=6)
    assert np.max(np.abs(always - plain)) > np.max(np.abs(some - plain)) > 1e-4


def test_prompt_to_prompt_in_the_pipeline_leaves_the_source_row_alone(pipe):
    from jaxdiff.errors import UserError
    from jaxdiff.sampling.prompt_to_prompt import PromptToPrompt

    prompts = ["a b c", "a x c"]  # a word swap: equal token counts
    noise = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32).repeat(2, axis=0)
    kwargs = dict(steps=3, guidance=5.0, latents=noise)
    plain = pipe(prompts, **kwargs)
    off = pipe(prompts, attention_edit=PromptToPrompt(2, cross_replace=0.0, self_replace=0.0), **kwargs)
    np.testing.assert_allclose(off, plain, atol=1e-4, rtol=0)  # window empty: plain sampling
    edited = pipe(prompts, attention_edit=PromptToPrompt(2, cross_replace=1.0, self_replace=1.0), **kwargs)
    np.testing.assert_allclose(edited[0], plain[0], atol=1e-4, rtol=0)  # the source row is never edited
    weighted = pipe(prompts, attention_edit=PromptToPrompt(2, 1.0, 1.0, equalizer=((2, 3.0),)), **kwargs)
    np.testing.assert_allclose(weighted[0], plain[0], atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="set up for 3 prompts"):
        pipe(prompts, attention_edit=PromptToPrompt(3), **kwargs)
    with pytest.raises(UserError, match="cross_replace must be a fraction"):
        PromptToPrompt(2, cross_replace=1.5)


def test_prompt_to_prompt_edit_replaces_targets_by_the_source_inside_its_window():
    from jaxdiff.sampling.prompt_to_prompt import PromptToPrompt

    rng = np.random.default_rng(0)
    probs = jnp.asarray(rng.dirichlet(np.ones(5), size=(4, 2, 16)), jnp.float32)  # [src, tgt, uncond x 2]
    cross = ac.Layer("up/attn2", cross=True, queries=16, heads=2)
    self_ = ac.Layer("up/attn1", cross=False, queries=16, heads=2)
    edit = PromptToPrompt(2, cross_replace=0.5, self_replace=0.25, equalizer=((3, 2.0),))
    out = edit(probs, cross, 2, 10)  # step 2 of 10: inside both windows
    np.testing.assert_array_equal(out[0], probs[0])
    np.testing.assert_array_equal(out[2:], probs[2:])  # the unconditional rows are never edited
    np.testing.assert_allclose(out[1], probs[0] * jnp.asarray([1, 1, 1, 2.0, 1]), rtol=1e-6)
    np.testing.assert_array_equal(edit(probs, cross, 5, 10), probs)  # outside the cross window
    np.testing.assert_array_equal(edit(probs, self_, 2, 10)[1], probs[0])
    np.testing.assert_array_equal(edit(probs, self_, 3, 10), probs)  # outside the self window
    big = ac.Layer("down/attn1", cross=False, queries=32 * 32, heads=2)
    np.testing.assert_array_equal(edit(probs, big, 0, 10), probs)  # self-attention above 16x16 queries is kept
