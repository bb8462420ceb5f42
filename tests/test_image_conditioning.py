"""img2img and inpainting (9-channel UNet and mask blending) against diffusers' pipelines on tiny random models."""

import types

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from test_convert_io import UNET, tiny_pipeline

from jaxdiff.errors import UserError
from jaxdiff.sampling import image_conditioning
from jaxdiff.sampling.pipeline import load_pipeline

PROMPTS = ["a b c", "x y"]
SIZE = 16  # the tiny pipeline's images; latents are 8x8x4


def _deterministic_vae(folder):
    """Give the saved VAE a posterior std of exp(-15) (logvar at diffusers' clamp of -30): encoding samples become
    the mean to 3e-7, so both sides agree whatever random numbers each draws for the posterior."""
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        latent = vae.config.latent_channels
        vae.quant_conv.weight[latent:] = 0.0
        vae.quant_conv.bias[latent:] = -30.0
    vae.save_pretrained(folder / "vae")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tiny_pipeline(tmp_path_factory.mktemp("img2img") / "pipe")
    _deterministic_vae(folder)
    return folder


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory, folder):
    """The tiny pipeline with a 9-channel inpainting UNet, saved as a StableDiffusionInpaintPipeline."""
    ref = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    g = torch.Generator().manual_seed(5)
    unet = UNet2DConditionModel(**{**UNET, "in_channels": 9})
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ref.unet = unet.eval()
    out = folder.parent / "inpaint"
    ref.save_pretrained(out)
    return out


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.1, 0.9, (len(PROMPTS), SIZE, SIZE, 3)).astype(np.float32)
    mask = np.zeros((len(PROMPTS), SIZE, SIZE), np.float32)
    mask[0, 4:12, 2:10] = 1.0
    mask[1, 8:, :] = 0.7  # binarized to 1
    return image, mask


def _check_images(images, expected, bound):
    assert images.shape == expected.shape
    # Not saturated, not flat: parity on clipped or constant images would pass whatever the model did.
    assert 0.5 < np.mean((expected > 0.01) & (expected < 0.99))
    assert np.all(expected.std(axis=(1, 2)) > 0.02)
    err = float(np.max(np.abs(images - expected)))
    assert err <= bound, f"max abs error {err:.3g} > {bound}"


@pytest.mark.parametrize("scheduler,strength", [("ddim", 0.6), ("euler", 0.75)])
def test_img2img_matches_diffusers(folder, scheduler, strength):
    ref = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
    if scheduler == "euler":
        ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    image, _ = _inputs()
    steps = 10
    expected = ref(
        PROMPTS,
        image=image,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    # The reference's generator drew the posterior sample first (a no-op here), then the noise it added.
    g = torch.Generator().manual_seed(0)
    torch.randn((len(PROMPTS), 4, SIZE // 2, SIZE // 2), generator=g)
    noise = torch.randn((len(PROMPTS), 4, SIZE // 2, SIZE // 2), generator=g).permute(0, 2, 3, 1).numpy()
    pipe = load_pipeline(folder)
    images = pipe(
        PROMPTS, steps=steps, guidance=7.5, scheduler=scheduler, latents=noise, image=image, strength=strength
    )
    _check_images(images, expected, 1e-3)
    # The image matters: another image, same noise, gives other pixels.
    other = pipe(PROMPTS, steps=steps, guidance=7.5, scheduler=scheduler, latents=noise, image=1.0 - image)
    assert np.max(np.abs(other - images)) > 0.01


@pytest.mark.parametrize("kind", ["concat", "blend"])
def test_inpainting_matches_diffusers(folder, inpaint_folder, kind):
    src = inpaint_folder if kind == "concat" else folder
    ref = StableDiffusionInpaintPipeline.from_pretrained(src, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    image, mask = _inputs(1)
    noise = np.random.default_rng(2).standard_normal((len(PROMPTS), SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    expected = ref(
        PROMPTS,
        image=image,
        mask_image=mask[..., None],
        num_inference_steps=8,
        guidance_scale=5.0,
        latents=torch.from_numpy(noise).permute(0, 3, 1, 2),
        output_type="np",
    ).images
    pipe = load_pipeline(src)
    images = pipe(PROMPTS, steps=8, guidance=5.0, latents=noise, image=image, mask=mask)
    _check_images(images, expected, 1e-3)


def test_blending_keeps_the_unmasked_latents(folder):
    """With mask blending the final latent outside the mask is the image's own latent: decoding the unmasked
    region of an all-zero mask reproduces the VAE round trip of the image."""
    pipe = load_pipeline(folder)
    image, _ = _inputs(3)
    kept = pipe(PROMPTS, steps=6, guidance=5.0, image=image, mask=np.zeros((SIZE, SIZE)), seed=1)
    z = pipe.vae.encode(pipe.params["vae"], image * 2 - 1)[0] * pipe.vae.config["scaling_factor"]
    np.testing.assert_allclose(kept, np.asarray(pipe.decode_latents(pipe.params["vae"], z)), atol=1e-5)


def test_strength_start_step_matches_diffusers():
    for steps in (1, 7, 25, 50):
        for strength in (0.05, 0.3, 0.5, 0.99, 1.0):
            scheduler = types.SimpleNamespace(order=1, timesteps=torch.arange(steps), set_begin_index=lambda i: None)
            owner = types.SimpleNamespace(scheduler=scheduler)
            timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(owner, steps, strength, "cpu")
            assert steps - image_conditioning.start_step(steps, strength) == len(timesteps), (steps, strength)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(strength=0.5), "needs an image"),
        (dict(image=np.zeros((SIZE, SIZE, 3)), strength=0.0), r"strength must be in \(0, 1\]"),
        (dict(image=np.zeros((SIZE, SIZE, 3)), strength=1.5), r"strength must be in \(0, 1\]"),
        (dict(image=np.zeros((SIZE, SIZE, 3)), mask=np.zeros((8, 8))), "mask is 8x8 but the image is 16x16"),
        (dict(image=np.zeros((SIZE, SIZE, 3)), strength=0.01), "leaves no denoising step"),
        (dict(image=np.full((SIZE, SIZE, 3), 2.0)), r"in \[0, 1\]"),
        (dict(image=np.zeros((3, SIZE, SIZE, 3))), "3 images for 2 prompts"),
        (dict(image=np.zeros((SIZE, SIZE, 3)), cache="deepcache:2"), "cannot be combined with an image"),
        (dict(image=np.zeros((SIZE, SIZE, 3)), height=32), "come from the image"),
        (dict(denoising_end=1.5), r"denoising_end must be in \(0, 1\)"),
        (dict(denoising_start=0.5), "denoising_start needs init_latents"),
        (dict(init_latents=np.zeros((2, 8, 8, 3))), r"init_latents must be \[B, h, w, 4\]"),
        (dict(init_latents=np.zeros((2, 8, 8, 4)), denoising_start=0.3, denoising_end=0.2), "is not before"),
        (dict(output="pil"), "output must be 'images' or 'latents'"),
    ],
)
def test_bad_input_is_a_clear_error(folder, kwargs, match):
    with pytest.raises(UserError, match=match):
        load_pipeline(folder)(PROMPTS, steps=10, **kwargs)


def test_inpainting_unet_needs_a_mask(inpaint_folder):
    pipe = load_pipeline(inpaint_folder)
    with pytest.raises(UserError, match="inpainting UNet"):
        pipe(PROMPTS, steps=4)
    with pytest.raises(UserError, match="give a mask"):
        pipe(PROMPTS, steps=4, image=np.zeros((SIZE, SIZE, 3)))
