"""Attacks on erased models (RECE regenerating embedding, soft-prompt attack) and the inputs they need: CLIP
token embeddings and pipeline prompt_embeds, on the built-in shapes model."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.erase import attacks, common, ridge, uce
from jaxdiff.sampling import text

ASSETS = Path(__file__).resolve().parent.parent / "jaxdiff" / "assets" / "shapes"
pytestmark = pytest.mark.skipif(not (ASSETS / "jaxdiff.json").is_file(), reason="shapes assets not trained yet")

PROMPTS = ["a red circle", "a small blue circle on the left"]
SAMPLING = dict(steps=6, guidance=5.0, seed=3)  # one sampler compile shared by the tests below


@pytest.fixture(scope="module")
def pipe():
    from jaxdiff.sampling.pipeline import load_pipeline

    return load_pipeline("shapes")


@pytest.fixture(scope="module")
def erased(pipe):
    """The shapes UNet with "circle" erased by UCE (towards the empty prompt, squares preserved)."""
    edit = common.encode(pipe, ["circle", "a circle", "red circle"])
    guide = common.encode(pipe, [""])
    preserve = common.encode(pipe, ["square", "triangle"])
    params, _ = uce.uce(pipe.params["unet"], edit, guide, preserve, lam=0.1)
    return params


@pytest.fixture(scope="module")
def attacked(pipe, erased, target_latents):
    """One soft-prompt attack on the erased model (the compiled programs stay cached on `pipe`)."""
    return attacks.soft_prompt_attack(pipe, erased, PROMPTS, target_latents, steps=20, learning_rate=1e-2, seed=1)


@pytest.fixture(scope="module")
def target_latents(pipe):
    """Scaled latents of circles made by the original model (images encoded back with the VAE)."""
    images = pipe(PROMPTS, **SAMPLING)
    mean, _ = jax.jit(pipe.vae.encode)(pipe.params["vae"], jnp.asarray(images) * 2 - 1)
    return mean * pipe.vae.config["scaling_factor"]


# ------------------------------------------------------------------------------ CLIP and pipeline inputs


def test_clip_token_embeds_equal_the_lookup(pipe):
    encoder, params = pipe.text_encoders[0], pipe.params["text_encoders"][0]
    ids = jnp.asarray(text.tokenize(pipe.tokenizers[0], PROMPTS))
    table = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    by_ids = encoder.apply(params, ids)
    by_embeds = encoder.apply(params, ids, token_embeds=jnp.take(table, ids, axis=0))
    for key in ("last_hidden_state", "pooler_output"):
        np.testing.assert_array_equal(np.asarray(by_embeds[key]), np.asarray(by_ids[key]))
    for a, b in zip(by_embeds["hidden_states"], by_ids["hidden_states"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="token_embeds must have shape"):
        encoder.apply(params, ids, token_embeds=jnp.zeros((2, 5, 128)))


def test_pipeline_prompt_embeds_give_the_prompts_images(pipe, target_latents):
    expected = pipe(PROMPTS, **SAMPLING)
    context, _ = pipe.encode_prompts(PROMPTS)
    images = pipe(prompt_embeds=context, **SAMPLING)
    np.testing.assert_allclose(images, expected, atol=1e-5)
    negative = jnp.broadcast_to(pipe.encode_prompts([""])[0], context.shape)
    again = pipe(prompt_embeds=context, negative_prompt_embeds=negative, **SAMPLING)
    np.testing.assert_array_equal(again, images)
    with pytest.raises(ValueError, match="not both"):
        pipe(PROMPTS, prompt_embeds=context)
    with pytest.raises(ValueError, match=r"\[B, L, D\]"):
        pipe(prompt_embeds=context[0])
    with pytest.raises(ValueError, match="no prompts"):
        pipe()
    # SDXL (base or refiner) is told by the UNet's text_time conditioning.
    sdxl_unet = dataclasses.replace(pipe.unet, config={**pipe.unet.config, "addition_embed_type": "text_time"})
    sdxl_like = dataclasses.replace(pipe, unet=sdxl_unet, _compiled={})
    with pytest.raises(ValueError, match="SD 1.x/2.x"):
        sdxl_like(prompt_embeds=context)


# ------------------------------------------------------------------------------ RECE regenerating embedding


def _kv_gap(edited, original, adversarial, concept):
    """Σ_l ||W'_l c' − W_l c||² over every attn2 K/V matrix (token rows)."""
    return sum(float(jnp.sum(jnp.square(adversarial @ edited[n].T - concept @ original[n].T))) for n in edited)


def test_regenerating_embedding_without_edit_reproduces_the_kv(pipe):
    params = pipe.params["unet"]
    mats = ridge.get_kv(params)
    c = common.encode(pipe, PROMPTS).emb
    scale = _kv_gap(mats, mats, jnp.zeros_like(c), c)
    near = attacks.regenerating_embedding_attack(params, params, c, reg=1e-6)
    ridged = attacks.regenerating_embedding_attack(params, params, c, reg=10.0)
    assert near.shape == c.shape and near.dtype == jnp.float32
    assert _kv_gap(mats, mats, near, c) < 1e-6 * scale
    assert _kv_gap(mats, mats, ridged, c) > 100 * _kv_gap(mats, mats, near, c)  # the ridge term matters


@pytest.mark.parametrize("with_to_k", [True, False])
def test_regenerating_embedding_undoes_a_uce_edit(pipe, erased, with_to_k):
    names = ridge.KV_NAMES if with_to_k else ("to_v",)
    edited, original = ridge.get_kv(erased, names), ridge.get_kv(pipe.params["unet"], names)
    c = common.encode(pipe, ["a red circle", "circle"]).emb
    reg = 1e-3
    adversarial = attacks.regenerating_embedding_attack(erased, pipe.params["unet"], c, reg=reg, with_to_k=with_to_k)
    # the closed form is the ridge least-squares solution of the stacked system (numpy reference)
    we = np.concatenate([np.asarray(edited[n], np.float64) for n in edited])
    wo = np.concatenate([np.asarray(original[n], np.float64) for n in edited])
    d = we.shape[1]
    lhs = np.concatenate([we, np.sqrt(reg) * np.eye(d)])
    rhs = np.concatenate([wo @ np.asarray(c, np.float64).reshape(-1, d).T, np.zeros((d, c.shape[0] * c.shape[1]))])
    expected = np.linalg.lstsq(lhs, rhs, rcond=None)[0].T.reshape(c.shape)
    np.testing.assert_allclose(np.asarray(adversarial), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    # it brings the edited model's K/V back towards the original's, which the plain concept does not
    gap_plain, gap_attack = _kv_gap(edited, original, c, c), _kv_gap(edited, original, adversarial, c)
    assert gap_attack < 0.5 * gap_plain


# ------------------------------------------------------------------------------------ soft-prompt attack


def test_soft_prompt_attack_lowers_the_erased_models_loss(pipe, erased, attacked):
    contexts, info = attacked
    assert contexts.shape == (len(PROMPTS), 32, 128) and contexts.dtype == jnp.float32
    assert set(info) >= {"loss_first", "loss_last", "seconds", "steps"} and info["steps"] == 20
    assert np.isfinite(info["loss_first"]) and info["loss_last"] < 0.8 * info["loss_first"]
    # the contexts condition the pipeline's compiled sampler directly
    images = pipe(prompt_embeds=contexts, params={**pipe.params, "unet": erased}, **SAMPLING)
    assert images.shape == (len(PROMPTS), 32, 32, 3)


def test_soft_prompt_attack_without_steps_is_the_placeholder_prompt(pipe, erased, target_latents, attacked):
    contexts, info = attacks.soft_prompt_attack(pipe, erased, PROMPTS, target_latents, steps=0, seed=1)
    assert info["loss_last"] == info["loss_first"] == attacked[1]["loss_first"]  # same fixed evaluation draws
    expected, _ = pipe.encode_prompts(attacks.placeholder_prompts(PROMPTS, 3))
    np.testing.assert_allclose(np.asarray(contexts), np.asarray(expected), atol=1e-5)


def test_placeholder_prompts_and_length_check(pipe, erased, target_latents):
    assert attacks.placeholder_prompts(["a red circle", ""], 2) == ["* * a red circle", "* *"]
    ids = attacks.placeholder_ids(pipe.tokenizers[0], PROMPTS, 3)
    star = pipe.tokenizers[0]("*", add_special_tokens=False).input_ids[0]
    assert ids.shape == (2, 32) and np.all(ids[:, 1:4] == star)
    with pytest.raises(text.PromptTooLongError, match="placeholder tokens"):
        attacks.soft_prompt_attack(pipe, erased, PROMPTS, target_latents, num_tokens=26, steps=0)
    with pytest.raises(ValueError, match="num_tokens"):
        attacks.placeholder_prompts(PROMPTS, 0)
    with pytest.raises(ValueError, match="target_latents"):
        attacks.soft_prompt_attack(pipe, erased, PROMPTS, target_latents[0], steps=0)
    assert jax.tree_util.tree_structure(erased) == jax.tree_util.tree_structure(pipe.params["unet"])
