"""Prompt-to-prompt LocalBlend: a mask of ones is plain prompt-to-prompt bitwise, a mask of zeros gives the source
latent, and the mask is computed from the attention of the named words only."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_convert_io import tiny_pipeline

from jaxdiff.errors import UserError
from jaxdiff.sampling import prompt_to_prompt as p2p
from jaxdiff.sampling.pipeline import load_pipeline

PROMPTS = ["a b c", "a x c"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(tiny_pipeline(tmp_path_factory.mktemp("blend") / "pipe"))


def run(pipe, blend, output="latents"):
    noise = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
    edit = p2p.PromptToPrompt(2, cross_replace=0.6, self_replace=0.3)
    return p2p.sample(pipe, PROMPTS, edit, blend, steps=4, guidance=5.0, latents=noise, output=output)


def test_without_blend_sample_is_the_pipelines_prompt_to_prompt(pipe):
    noise = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32).repeat(2, axis=0)
    edit = p2p.PromptToPrompt(2, cross_replace=0.6, self_replace=0.3)
    images = pipe(PROMPTS, steps=4, guidance=5.0, latents=noise, attention_edit=edit)
    mine, mask = run(pipe, None, output="images")
    np.testing.assert_array_equal(mine, images)
    assert mask.all()


def test_mask_of_ones_is_plain_prompt_to_prompt_bitwise(pipe):
    plain, _ = run(pipe, None)
    tok = pipe.tokenizers[0]
    tokens = (p2p.word_tokens(tok, PROMPTS[0], "b"), p2p.word_tokens(tok, PROMPTS[1], "x"))
    blended, mask = run(pipe, p2p.LocalBlend(tokens, threshold=-1.0, start=0.0, side=4))
    assert mask.all()
    np.testing.assert_array_equal(blended, plain)


def test_mask_of_zeros_gives_the_source_latent(pipe):
    plain, _ = run(pipe, None)
    blended, mask = run(pipe, p2p.LocalBlend(((2,), (2,)), threshold=1.0, start=0.0, side=4))
    assert not mask.any()
    np.testing.assert_array_equal(blended[1], blended[0])
    np.testing.assert_array_equal(blended[0], plain[0])  # the source row is never blended
    assert np.abs(plain[1] - plain[0]).max() > 1e-3  # without the blend the target differs


def test_mask_uses_the_named_words_attention_only():
    rng = np.random.default_rng(0)
    blend = p2p.LocalBlend(((1,), (2, 3)), side=4, pool=1)
    probs = {"up/attn2": rng.random((2, 2, 16, 6)), "down/attn2": rng.random((2, 2, 16, 6))}
    probs["mid/attn2"] = rng.random((2, 2, 4, 6))  # another resolution: not used
    maps = blend.maps({k: jnp.asarray(v, jnp.float32) for k, v in probs.items()})
    other = {k: v.copy() for k, v in probs.items()}
    other["up/attn2"][0, :, :, [0, 2, 3, 4, 5]] = rng.random((5, 2, 16))  # row 0 named only token 1
    other["up/attn2"][1, :, :, [0, 1, 4, 5]] = rng.random((4, 2, 16))
    other["mid/attn2"] = rng.random((2, 2, 4, 6))
    np.testing.assert_array_equal(blend.maps({k: jnp.asarray(v, jnp.float32) for k, v in other.items()}), maps)
    named = {k: v.copy() for k, v in probs.items()}
    named["up/attn2"][1, :, :, 3] += 1.0
    assert np.abs(blend.maps({k: jnp.asarray(v, jnp.float32) for k, v in named.items()}) - maps).max() > 0.1
    expected = probs["up/attn2"][1][..., [2, 3]].sum(-1).mean(0) + probs["down/attn2"][1][..., [2, 3]].sum(-1).mean(0)
    np.testing.assert_allclose(maps[1].reshape(-1), expected / 2, rtol=1e-5)
    # A peak in one cell: after the 1x1 pool and the upsampling only that cell's 2x2 block passes 0.3 of the max.
    peak = jnp.zeros((2, 4, 4)).at[:, 1, 2].set(1.0)
    mask = np.asarray(blend.mask(peak, 8, 8))[..., 0]
    assert mask[0].sum() == 4 and mask[0, 2:4, 4:6].all()
    pooled = np.asarray(p2p.LocalBlend(((1,), (2,)), side=4).mask(peak, 8, 8))[..., 0]  # 3x3 max-pool dilates
    assert pooled[0].sum() == 36


def test_local_blend_rejects_bad_settings(pipe):
    with pytest.raises(UserError, match="at least one chosen token"):
        p2p.LocalBlend(((1,), ()))
    with pytest.raises(UserError, match="pool must be odd"):
        p2p.LocalBlend(((1,), (1,)), pool=2)
    with pytest.raises(UserError, match="not in the prompt"):
        p2p.word_tokens(pipe.tokenizers[0], "a b c", "zebra")
    with pytest.raises(UserError, match="no cross-attention at 3x3"):
        run(pipe, p2p.LocalBlend(((1,), (1,)), side=3))


def reference(pipe, prompts, edit, blend, latents, steps, guidance, seed=0):
    """prompt_to_prompt.sample's own loop before it ran in the pipeline (commit 8dd7b70): (latents, mask)."""

    import jax

    from jaxdiff.models import attention_control as ac
    from jaxdiff.sampling import make_scheduler
    from jaxdiff.sampling.cache import CachedUNet

    sched = make_scheduler(pipe.default_scheduler(), pipe.scheduler_config)
    plan = sched.plan(steps)
    n = len(prompts)
    context, _ = pipe.encode_prompts(list(prompts) + [""] * n)

    def program(unet_params, plan, context, latents, guidance, key):
        model = CachedUNet(pipe.unet.module, unet_params)
        num_steps = plan.timesteps.shape[0]

        def call(x, t, i):
            captured = {}

            def hook(probs, layer):
                if layer.cross and layer.side == blend.side:
                    captured[layer.name] = probs[:n]
                return edit(probs, layer, i, num_steps)

            with ac.control(edit=hook):
                out = model(x, t, (context, None))
            return out, captured

        def body(i, state):
            x, carry, key, acc, mask = state
            key, step_key = jax.random.split(key)
            x_in = sched.scale_model_input(plan, x, i)
            model_in = jnp.concatenate([x_in, x_in])
            out, captured = call(model_in, jnp.broadcast_to(plan.timesteps[i], (model_in.shape[0],)), i)
            out_cond, out_uncond = jnp.split(out, 2)
            out = out_uncond + guidance * (out_cond - out_uncond)
            x_next, carry = sched.step(plan, out, i, x, carry, step_key)
            maps = blend.maps(captured)
            acc = acc + maps if blend.accumulate else maps
            mask = blend.mask(acc, x.shape[1], x.shape[2])
            blended = jnp.where(mask, x_next, x_next[:1])
            x_next = jnp.where(i >= blend.start_step(num_steps), blended, x_next)
            return x_next, carry, key, acc, mask

        x = latents * plan.init_noise_sigma
        state = (
            x,
            sched.init_carry(plan, x),
            key,
            jnp.zeros((n, blend.side, blend.side)),
            jnp.ones(x.shape[:3] + (1,), bool),
        )
        x, _, _, _, mask = jax.lax.fori_loop(0, num_steps, body, state)
        return x, mask[..., 0]

    fn = jax.jit(program)
    x, mask = fn(pipe.unet.params, plan, context, latents, jnp.float32(guidance), jax.random.PRNGKey(seed + 1))
    return np.asarray(x), np.asarray(mask)


def test_local_blend_in_the_pipeline_equals_the_reference_loop(pipe):
    noise = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32).repeat(2, axis=0)
    edit = p2p.PromptToPrompt(2, cross_replace=0.6, self_replace=0.3)
    tok = pipe.tokenizers[0]
    tokens = (p2p.word_tokens(tok, PROMPTS[0], "b"), p2p.word_tokens(tok, PROMPTS[1], "x"))
    # The tiny UNet's 4x4 maps are nearly flat: a threshold near 1 makes a partial mask (48 and 56 of 64 cells).
    blend = p2p.LocalBlend(tokens, threshold=0.995, start=0.0, pool=1)
    kw = dict(steps=4, guidance=5.0, latents=noise, output="latents", attention_edit=edit)
    mine, (acc, mask) = pipe(PROMPTS, step_callback=blend, return_callback_state=True, **kw)
    ref, ref_mask = reference(pipe, PROMPTS, edit, blend, jnp.asarray(noise), steps=4, guidance=5.0)
    np.testing.assert_array_equal(mask[..., 0], ref_mask)
    assert 0 < ref_mask[1].sum() < ref_mask[1].size  # the blend is neither all-target nor all-source
    np.testing.assert_array_equal(mine, ref)
    assert acc.shape == (2, 4, 4)
    images_only = pipe(PROMPTS, step_callback=blend, **kw)  # without return_callback_state: the output alone
    np.testing.assert_array_equal(images_only, mine)
    sampled, sampled_mask = p2p.sample(pipe, PROMPTS, edit, blend, steps=4, guidance=5.0, latents=noise[:1])
    np.testing.assert_array_equal(sampled_mask, ref_mask)
    np.testing.assert_array_equal(sampled, pipe(PROMPTS, step_callback=blend, **{**kw, "output": "images"}))


class Unchanged(p2p.StepCallback):
    """Returns the latents as they are; reads the 4x4 cross-attention when `cross` is set."""

    def __init__(self, cross=False):
        self.cross = cross

    def capture(self, layer):
        return self.cross and layer.cross

    def __call__(self, latents, step, num_steps, captures, state):
        assert bool(captures) == self.cross and all(p.shape[0] == latents.shape[0] for p in captures.values())
        return latents, state


def test_a_callback_that_returns_the_latents_unchanged_is_plain_sampling_bitwise(pipe):
    noise = np.random.default_rng(4).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kw = dict(steps=3, guidance=5.0, latents=noise)
    np.testing.assert_array_equal(pipe(PROMPTS, step_callback=Unchanged(), **kw), pipe(PROMPTS, **kw))
    edit = p2p.PromptToPrompt(2, cross_replace=0.6, self_replace=0.3)
    np.testing.assert_array_equal(
        pipe(PROMPTS, attention_edit=edit, step_callback=Unchanged(cross=True), **kw),
        pipe(PROMPTS, attention_edit=edit, **kw),
    )
    with pytest.raises(UserError, match="step_callback cannot be combined"):
        pipe(PROMPTS, step_callback=Unchanged(), cache="deepcache:2", **kw)
    with pytest.raises(UserError, match="needs a step_callback"):
        pipe(PROMPTS, return_callback_state=True, **kw)
    with pytest.raises(UserError, match="tokens for 3 prompts"):
        pipe(PROMPTS, step_callback=p2p.LocalBlend(((1,), (1,), (1,))), **kw)
