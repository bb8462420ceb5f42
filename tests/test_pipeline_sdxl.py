"""SDXL text-to-image parity with diffusers' StableDiffusionXLPipeline (two text encoders, text_time conditioning)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from parity import assert_parity
from test_convert_io import VAE, _randomized

from jaxdiff.data.tokenizer import build_clip_tokenizer
from jaxdiff.sampling import text
from jaxdiff.sampling.pipeline import load_pipeline

PROMPTS = ["a red cube", "two blue balls"]
# Not square, so that time_ids = [h, w, 0, 0, h, w] in the wrong order would show.
STEPS, GUIDANCE, HEIGHT, WIDTH = 4, 5.0, 16, 24

CLIP = dict(
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
TEXT_DIMS, POOLED_DIM, TIME_DIM = (16, 32), 24, 8
UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=1,
    use_linear_projection=True,
    cross_attention_dim=sum(TEXT_DIMS),
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_DIM,
)
# SDXL base's scheduler_config.json.
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    use_karras_sigmas=False,
)


def tiny_sdxl_pipeline(folder):
    """Save a tiny random StableDiffusionXLPipeline into `folder` (offline word-level CLIP tokenizers)."""
    words = " ".join(PROMPTS).split()
    tokenizer = build_clip_tokenizer(words, folder.parent / "tok", model_max_length=16)
    # SDXL's second tokenizer pads with "!" (OpenCLIP), not with the end-of-text token.
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(str(folder.parent / "tok"), pad_token="!")
    vocab = len(tokenizer)
    te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=TEXT_DIMS[0], **CLIP))
    te2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=TEXT_DIMS[1], projection_dim=POOLED_DIM, **CLIP)
    )
    pipe = StableDiffusionXLPipeline(
        vae=_randomized(AutoencoderKL(**VAE), 1),
        text_encoder=_randomized(te1, 2),
        text_encoder_2=_randomized(te2, 3),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_randomized(UNet2DConditionModel(**UNET), 4),
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # The tiny reference is latency-bound: on a busy machine, intra-op threads make each call take seconds, not ms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="module")
def pipe(folder):
    return load_pipeline(folder)


@pytest.fixture(scope="module")
def ref(folder):
    ref = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def latents(pipe):
    shape = (len(PROMPTS), HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor, 4)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _reference(ref, latents, **kwargs):
    with torch.no_grad():
        return ref(
            PROMPTS,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            height=HEIGHT,
            width=WIDTH,
            latents=torch.from_numpy(latents).permute(0, 3, 1, 2),  # NHWC -> NCHW, the same unit noise
            output_type="np",
            **kwargs,
        ).images


def _sample(pipe, latents, negative=None, scheduler=None):
    return pipe(
        PROMPTS,
        negative,
        steps=STEPS,
        guidance=GUIDANCE,
        scheduler=scheduler,
        height=HEIGHT,
        width=WIDTH,
        latents=latents,
    )


def test_tiny_pipeline_is_sdxl(folder, pipe, ref):
    assert pipe.is_sdxl and pipe.default_scheduler() == "euler"
    ids = [text.tokenize(tok, PROMPTS) for tok in pipe.tokenizers]
    assert ids[1][0, -1] == pipe.tokenizers[1].convert_tokens_to_ids("!") != ids[0][0, -1]
    assert ref.config.force_zeros_for_empty_prompt and pipe.force_zeros_for_empty_prompt
    assert json.loads((folder / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True


@pytest.mark.parametrize(
    "scheduler,negative",
    [("euler", None), ("euler", ""), ("ddim", None)],
    ids=["euler-zero-negatives", "euler-empty-negative", "ddim-zero-negatives"],
)
def test_images_match_diffusers_sdxl_pipeline(pipe, ref, latents, scheduler, negative):
    if scheduler == "ddim":
        ddim = DDIMScheduler.from_config(ref.scheduler.config)
        ref = StableDiffusionXLPipeline(**{**ref.components, "scheduler": ddim}, add_watermarker=False)
        ref.set_progress_bar_config(disable=True)
    # diffusers zeroes the negative embeddings (context and pooled) only when negative_prompt is None.
    expected = _reference(ref, latents, negative_prompt=None if negative is None else [negative] * len(PROMPTS))
    images = _sample(pipe, latents, negative, scheduler)
    assert expected.shape == (len(PROMPTS), HEIGHT, WIDTH, 3)
    assert 0.5 < np.mean((expected > 0.01) & (expected < 0.99))  # mostly unclipped: the bound means something
    # Both sides float32 through 4 steps x 2 CFG branches and the VAE: measured <= 3e-6 on CPU.
    assert_parity(images, expected, rel=1e-4, what="SDXL images")


def test_zero_negatives_differ_from_encoded_empty_prompt(pipe, latents):
    zeros, empty = _sample(pipe, latents), _sample(pipe, latents, "")
    assert np.max(np.abs(zeros - empty)) > 1e-2  # the encoding of "" is far from zero in a random encoder
    # Off, no negative prompt means "" (the SD 1.x/2.x behaviour); the same compiled loop is reused.
    off = dataclasses.replace(pipe, force_zeros_for_empty_prompt=False)
    np.testing.assert_array_equal(_sample(off, latents), empty)


@pytest.mark.parametrize("value", [False, True, None], ids=["false", "true", "absent"])
def test_force_zeros_for_empty_prompt_is_read_from_model_index(folder, tmp_path, value):
    copy = tmp_path / "pipe"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index.pop("force_zeros_for_empty_prompt")
    if value is not None:
        index["force_zeros_for_empty_prompt"] = value
    (copy / "model_index.json").write_text(json.dumps(index))
    assert load_pipeline(copy).force_zeros_for_empty_prompt is (value is not False)  # diffusers' default: True


def tiny_sdxl_refiner(folder, base_folder):
    """A tiny random SDXL refiner (second text encoder only, aesthetic-score time ids) beside the tiny base."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base = StableDiffusionXLPipeline.from_pretrained(base_folder, add_watermarker=False)
    unet = UNet2DConditionModel(
        **{
            **UNET,
            "cross_attention_dim": TEXT_DIMS[1],
            "projection_class_embeddings_input_dim": POOLED_DIM + 5 * TIME_DIM,
        }
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=_randomized(unet, 5),
        scheduler=base.scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    refiner.save_pretrained(folder)
    return folder


def test_base_and_refiner_match_diffusers_ensemble_of_experts(folder, ref, pipe, latents, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    refiner_folder = tiny_sdxl_refiner(tmp_path / "refiner", folder)
    ref_refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder, add_watermarker=False)
    ref_refiner.set_progress_bar_config(disable=True)
    steps, split = 10, 0.7
    with torch.no_grad():
        handed = ref(
            PROMPTS,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            height=HEIGHT,
            width=WIDTH,
            latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
            denoising_end=split,
            output_type="latent",
        ).images
        expected = ref_refiner(
            PROMPTS, image=handed, num_inference_steps=steps, guidance_scale=GUIDANCE, denoising_start=split,
            output_type="np",
        ).images  # fmt: skip
    ours = pipe(
        PROMPTS, steps=steps, guidance=GUIDANCE, height=HEIGHT, width=WIDTH, latents=latents, denoising_end=split,
        output="latents",
    )  # fmt: skip
    assert_parity(ours, handed.permute(0, 2, 3, 1).numpy(), rel=1e-4, what="base latents at the hand-over")
    refiner = load_pipeline(refiner_folder)
    assert refiner.is_sdxl and refiner.requires_aesthetics_score and len(refiner.text_encoders) == 1
    images = refiner(PROMPTS, steps=steps, guidance=GUIDANCE, init_latents=ours, denoising_start=split)
    assert 0.5 < np.mean((expected > 0.01) & (expected < 0.99))
    assert_parity(images, expected, rel=1e-4, what="refined images")
    # The refiner's scores are in its time ids: another aesthetic score gives other pixels (more than the parity
    # bound of 1e-4 above; the tiny model's time embedding moves its 3 remaining steps by ~5e-4).
    other = refiner(PROMPTS, steps=steps, guidance=GUIDANCE, init_latents=ours, denoising_start=split,
                    aesthetic_score=2.0)  # fmt: skip
    assert np.max(np.abs(other - images)) > 2e-4
