"""Multi-Concept T2I-Zero: CbS against a loop reference (α = 0 a bitwise no-op, the window), CTNMS keeps only the
arg-max concept per pixel, and both run inside the one compiled sampling loop; per-stage conditioning [K, B, L, D]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_convert_io import tiny_pipeline

from jaxdiff.errors import UserError
from jaxdiff.models import attention_control as ac
from jaxdiff.sampling import denoise
from jaxdiff.sampling import t2i_zero as tz
from jaxdiff.sampling.pipeline import load_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(tiny_pipeline(tmp_path_factory.mktemp("t2i0") / "pipe"))


def _cbs_reference(f, concepts, last, alpha, threshold, window, first=1):
    """The CbS steps written out with loops in numpy."""
    f = np.asarray(f, np.float64)
    out = f.copy()
    q = 1 - np.exp(-10 * threshold)
    for b in range(f.shape[0]):
        for c in concepts:
            s = f[b, c][None] * f[b]
            tau = np.quantile(s, q)
            s = np.where(s > tau, s, 0.0)
            s = s / s.max() if s.max() > 0 else s
            acc = np.zeros(f.shape[-1])
            for j in range(f.shape[1]):
                if abs(j - c) <= window and first <= j <= last[b]:
                    acc += s[j] * f[b, j]
            out[b, c] = (1 - alpha) * f[b, c] + alpha * acc
    return out


def test_cbs_matches_the_loop_reference_and_touches_only_concept_rows():
    rng = np.random.default_rng(0)
    f = jnp.asarray(rng.standard_normal((2, 12, 16)), jnp.float32)
    concepts, last = (3, 7), (9, 8)
    out = np.asarray(tz.correct_by_similarities(f, concepts, last, alpha=0.6, threshold=0.1, window=2))
    ref = _cbs_reference(f, concepts, last, 0.6, 0.1, 2)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    others = [j for j in range(12) if j not in concepts]
    np.testing.assert_array_equal(out[:, others], np.asarray(f)[:, others])  # outside the concepts: untouched
    assert np.abs(out[:, concepts] - np.asarray(f)[:, concepts]).max() > 1e-2


def test_cbs_window_only_mixes_tokens_inside_it():
    rng = np.random.default_rng(1)
    f = np.asarray(rng.standard_normal((1, 12, 8)), np.float32)
    f[0, 3] = np.abs(f[0, 3])  # S_3 = f_3 ⊙ f_j keeps the sign of f_j
    g = f.copy()
    g[0, 9] = -np.abs(f[0, 9])  # row 9 is outside 3 ± 2: with S_3[9] <= 0 it is below τ both times
    f[0, 9] = -np.abs(f[0, 9]) * 0.5
    a = tz.correct_by_similarities(jnp.asarray(f), (3,), 10, alpha=1.0, threshold=0.05, window=2)
    b = tz.correct_by_similarities(jnp.asarray(g), (3,), 10, alpha=1.0, threshold=0.05, window=2)
    np.testing.assert_allclose(a[0, 3], b[0, 3], rtol=1e-6)
    # Window 0: only S_c[c] = f_c² survives, f_c ← Σ over one row; a window clipped by `last` drops later rows.
    w0 = np.asarray(tz.correct_by_similarities(jnp.asarray(f), (3,), 10, alpha=1.0, threshold=0.0, window=0))
    s = f[0, 3] * f[0, 3]
    top = (f[0, 3][None] * f[0]).max()
    np.testing.assert_allclose(w0[0, 3], np.where(s > np.quantile(f[0, 3][None] * f[0], 0.0), s, 0) / top * f[0, 3],
                               rtol=1e-5)  # fmt: skip
    clipped = tz.correct_by_similarities(jnp.asarray(f), (3,), 3, alpha=1.0, threshold=0.0, window=2)
    ref = _cbs_reference(f, (3,), (3,), 1.0, 0.0, 2)
    np.testing.assert_allclose(clipped, ref, rtol=1e-4, atol=1e-5)


def test_cbs_alpha_zero_is_a_bitwise_no_op_even_under_jit():
    rng = np.random.default_rng(2)
    f = jnp.asarray(rng.standard_normal((3, 10, 8)), jnp.float32).at[0, 2, 0].set(-0.0)
    out = tz.CbS((2, 5), 7, alpha=0.0)(f)
    np.testing.assert_array_equal(np.asarray(out).view(np.uint32), np.asarray(f).view(np.uint32))
    jitted = jax.jit(lambda x, a: tz.correct_by_similarities(x, (2, 5), 7, alpha=a))(f, 0.0)
    np.testing.assert_array_equal(np.asarray(jitted).view(np.uint32), np.asarray(f).view(np.uint32))
    with pytest.raises(UserError, match="step window"):
        tz.CbS((2,), 7, step_start=0.8, step_end=0.2)


def _smooth_ref(m, sigma):  # m [H, W]
    k = tz.gaussian_kernel(sigma)
    p = np.pad(m, 1, mode="edge")
    return sum(k[a, b] * p[a : a + m.shape[0], b : b + m.shape[1]] for a in range(3) for b in range(3))


def test_ctnms_keeps_only_the_argmax_concept_at_each_pixel():
    rng = np.random.default_rng(3)
    probs = jnp.asarray(rng.dirichlet(np.ones(6), size=(4, 2, 16)), jnp.float32)  # [cond x 2, uncond x 2]
    layer = ac.Layer("up/attn2", cross=True, queries=16, heads=2)
    edit = tz.CTNMS(tokens=(1, 4), num_prompts=2)
    out = np.asarray(edit(probs, layer, 0, 10))
    p = np.asarray(probs)
    np.testing.assert_array_equal(out[2:], p[2:])  # unconditional rows untouched
    np.testing.assert_array_equal(out[..., [0, 2, 3, 5]], p[..., [0, 2, 3, 5]])  # other tokens untouched
    for b in range(2):
        for h in range(2):
            score = np.stack([_smooth_ref(p[b, h, :, t].reshape(4, 4), 0.85).ravel() for t in (1, 4)], -1)
            win = score.argmax(-1)
            for q in range(16):
                kept = out[b, h, q, [1, 4]]
                assert np.count_nonzero(kept) == 1
                assert kept[win[q]] == p[b, h, q, (1, 4)[win[q]]]
    np.testing.assert_array_equal(edit(probs, ac.Layer("up/attn1", False, 16, 2), 0, 10), probs)  # self-attention
    late = tz.CTNMS(tokens=(1, 4), num_prompts=2, step_start=0.5)
    np.testing.assert_array_equal(late(probs, layer, 4, 10), probs)  # outside the step window
    half = np.asarray(tz.CTNMS(tokens=(1, 4), num_prompts=2, alpha=0.25)(probs, layer, 0, 10))
    np.testing.assert_allclose(half[:2], 0.75 * p[:2] + 0.25 * out[:2], rtol=1e-6)
    renorm = np.asarray(tz.CTNMS(tokens=(1, 4), num_prompts=2, renormalize=True)(probs, layer, 0, 10))
    np.testing.assert_allclose(renorm[:2].sum(-1), 1.0, rtol=1e-5)


def test_cbs_and_ctnms_run_inside_the_one_compiled_loop(pipe):
    prompts = ["a b c d e", "a x c y e"]
    noise = np.random.default_rng(4).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kwargs = dict(steps=3, guidance=5.0, latents=noise)
    plain = pipe(prompts, **kwargs)
    concepts, last = tz.token_positions(pipe.tokenizers[0], prompts[0], ["b", "d"])
    assert concepts == (2, 4) and last == 5
    off = pipe(prompts, text_correction=tz.CbS(concepts, last, alpha=0.0), **kwargs)
    np.testing.assert_allclose(off, plain, atol=1e-6, rtol=0)
    on = pipe(prompts, text_correction=tz.CbS(concepts, last, alpha=1.0, threshold=0.05), **kwargs)
    assert np.abs(on - plain).max() > 1e-4
    never = pipe(prompts, text_correction=tz.CbS(concepts, last, alpha=1.0, step_start=1.0), **kwargs)
    np.testing.assert_allclose(never, plain, atol=1e-6, rtol=0)  # empty window
    nms = pipe(prompts, attention_edit=tz.CTNMS(concepts, num_prompts=2), **kwargs)
    assert np.abs(nms - plain).max() > 1e-4
    both = pipe(prompts, attention_edit=tz.CTNMS(concepts, 2), text_correction=tz.CbS(concepts, last), **kwargs)
    assert both.shape == plain.shape and np.all(np.isfinite(both))


def test_stage_index_at_the_boundaries():
    t = jnp.asarray([0, 99, 100, 999, 500, 899, 900])
    np.testing.assert_array_equal(denoise.stage_index(t, 10, 1000), [0, 0, 1, 9, 5, 8, 9])
    np.testing.assert_array_equal(denoise.stage_index(jnp.asarray([99.9, 100.0]), 10), [0, 1])


def test_per_stage_conditioning_equal_stages_is_plain_and_stages_switch_by_timestep(pipe):
    noise = np.random.default_rng(5).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kwargs = dict(steps=4, guidance=5.0, latents=noise)
    context, _ = pipe.encode_prompts(["a b c", "d e f"])
    other, _ = pipe.encode_prompts(["x y z", "u v w"])
    by_prompt = pipe(["a b c", "d e f"], **kwargs)
    plain = pipe(prompt_embeds=context, **kwargs)
    np.testing.assert_allclose(plain, by_prompt, atol=2e-6, rtol=0)  # negatives encoded once and broadcast
    staged = pipe(prompt_embeds=jnp.stack([context] * 10), **kwargs)
    np.testing.assert_array_equal(staged, plain)
    # DDIM 4 steps of 1000: timesteps 750, 500, 250, 0 -> stages 7, 5, 2, 0; stages 8, 9 are never used.
    unused = pipe(prompt_embeds=jnp.stack([context] * 8 + [other] * 2), **kwargs)
    np.testing.assert_array_equal(unused, plain)
    swapped = pipe(prompt_embeds=jnp.stack([context] * 3 + [other] * 7), **kwargs)  # the first two steps see `other`
    assert np.abs(swapped - plain).max() > 1e-3
    with pytest.raises(UserError, match="per-stage"):
        pipe(prompt_embeds=jnp.stack([context] * 2), text_correction=tz.CbS((1,), 3), **kwargs)
