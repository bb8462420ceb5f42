"""Attacks on erased models (RECE regenerating embedding, soft-prompt attack) and the inputs they need: CLIP
token embeddings and pipeline prompt_embeds, on the built-in shapes model."""

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.erase import common, uce
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
def target_latents(pipe):
    """Scaled latents of circles made by the original model (images encoded back with the VAE)."""
    images = pipe(PROMPTS, **SAMPLING)
    mean, _ = pipe.vae.encode(pipe.params["vae"], jnp.asarray(images) * 2 - 1)
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
    sdxl_like = dataclasses.replace(pipe, text_encoders=pipe.text_encoders * 2, _compiled={})
    with pytest.raises(ValueError, match="SD 1.x/2.x"):
        sdxl_like(prompt_embeds=context)
