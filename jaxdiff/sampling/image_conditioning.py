"""Image-conditioned sampling: img2img (SDEdit) strength, inpainting masks (9-channel UNet or latent blending)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError

# What a pipeline does with an image: start from the noised image (img2img), or repaint a masked region with an
# inpainting UNet (its input is [latents, mask, masked-image latents]) or with any UNet by blending the known
# region back after every step (diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet).
IMG2IMG, INPAINT_CONCAT, INPAINT_BLEND = "img2img", "inpaint_concat", "inpaint_blend"


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """Validated host inputs: the image [B, H, W, 3] in [0, 1] or scaled latents [B, h, w, C] (one of the two),
    the mask [B, H, W, 1] in {0, 1} (1 = repaint) or None, the strength, the kind (IMG2IMG, INPAINT_CONCAT or
    INPAINT_BLEND), the plan step it starts at, and whether the start is noised (not for a refiner's latents)."""

    image: np.ndarray | None
    mask: np.ndarray | None
    strength: float
    kind: str
    start: int
    latents: np.ndarray | None = None
    add_noise: bool = True

    def pixel_size(self, vae_scale_factor: int) -> tuple[int, int]:
        if self.image is not None:
            return tuple(self.image.shape[1:3])
        return self.latents.shape[1] * vae_scale_factor, self.latents.shape[2] * vae_scale_factor


def as_image_batch(image, batch: int) -> np.ndarray:
    """[H, W, 3] or [B, H, W, 3], uint8 or float in [0, 1] -> float32 [batch, H, W, 3] (one image is repeated)."""
    x = np.asarray(image)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise UserError(f"image must be [H, W, 3] or [B, H, W, 3] RGB, got shape {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
        raise UserError("image values must be finite and in [0, 1] (or uint8)")
    if x.shape[0] not in (1, batch):
        raise UserError(f"{x.shape[0]} images for {batch} prompts (give one image or one per prompt)")
    return np.broadcast_to(x, (batch,) + x.shape[1:]).copy()


def as_mask_batch(mask, image: np.ndarray) -> np.ndarray:
    """[H, W], [H, W, 1], [B, H, W] or [B, H, W, 1] (uint8 or float; white / >= 0.5 = repaint) -> {0, 1} float32
    [B, H, W, 1] (diffusers' mask processor binarizes at 0.5)."""
    m = np.asarray(mask)
    if m.dtype == np.uint8:
        m = m.astype(np.float32) / 255.0
    m = m.astype(np.float32)
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim == 3 and m.shape[-1] == 1 and m.shape[:2] == image.shape[1:3]:
        m = m[..., 0]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise UserError(f"mask must be [H, W] or [B, H, W] (one channel), got shape {np.shape(mask)}")
    if m.shape[1:] != image.shape[1:3]:
        raise UserError(f"mask is {m.shape[1]}x{m.shape[2]} but the image is {image.shape[1]}x{image.shape[2]}")
    if m.shape[0] not in (1, image.shape[0]):
        raise UserError(f"{m.shape[0]} masks for {image.shape[0]} images (give one mask or one per image)")
    if not np.all(np.isfinite(m)):
        raise UserError("mask values must be finite")
    m = (m >= 0.5).astype(np.float32)
    return np.broadcast_to(m, (image.shape[0],) + m.shape[1:]).copy()[..., None]


def start_step(steps: int, strength: float) -> int:
    """The plan step img2img starts at: diffusers' get_timesteps, steps - min(int(steps * strength), steps)."""
    return max(steps - min(int(steps * strength), steps), 0)


def _checked_start(steps: int, strength: float) -> int:
    """start_step, or a UserError for a strength outside (0, 1] or one that leaves no step."""
    if not 0.0 < strength <= 1.0:
        raise UserError(f"strength must be in (0, 1], got {strength}")
    start = start_step(steps, strength)
    if start >= steps:
        raise UserError(f"strength {strength} with {steps} steps leaves no denoising step (raise either)")
    return start


def cutoff(fraction: float, num_train_timesteps: int) -> int:
    """The timestep where SDXL's base hands over to the refiner: round((1 - fraction) * num_train_timesteps)."""
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def _check_fraction(value, name: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise UserError(f"{name} must be in (0, 1), got {value}")
    return value


def end_step(timesteps: np.ndarray, denoising_end: float | None, num_train_timesteps: int) -> int | None:
    """The step a base model stops at for `denoising_end` (diffusers: the steps with t >= the cutoff run)."""
    if denoising_end is None:
        return None
    fraction = _check_fraction(denoising_end, "denoising_end")
    return int(np.sum(timesteps >= cutoff(fraction, num_train_timesteps)))


def request(
    image,
    mask,
    strength,
    batch: int,
    steps: int,
    unet_in_channels: int,
    latent_channels: int,
    *,
    init_latents=None,
    denoising_start: float | None = None,
    timesteps: np.ndarray | None = None,
    num_train_timesteps: int = 1000,
):
    """An ImageRequest from user inputs, or one-line UserErrors (strength outside (0, 1], sizes, an inpainting
    UNet without a mask, a UNet whose input channels fit neither kind, a denoising_start without latents)."""
    inpainting_unet = unet_in_channels == 2 * latent_channels + 1
    if init_latents is not None:
        if image is not None or mask is not None:
            raise UserError("give an image or init_latents, not both (and no mask with latents)")
        if inpainting_unet:
            raise UserError("this is an inpainting UNet (9 input channels): give an image and a mask")
        latents = np.asarray(init_latents, np.float32)
        if latents.ndim != 4 or latents.shape[-1] != latent_channels or latents.shape[0] not in (1, batch):
            raise UserError(
                f"init_latents must be [B, h, w, {latent_channels}] for {batch} prompts, got {tuple(latents.shape)}"
            )
        latents = np.broadcast_to(latents, (batch,) + latents.shape[1:]).copy()
        if denoising_start is not None:  # the refiner: the remaining steps, on the latents as they are
            if strength is not None:
                raise UserError("give denoising_start or strength, not both")
            fraction = _check_fraction(denoising_start, "denoising_start")
            start = steps - int(np.sum(np.asarray(timesteps) < cutoff(fraction, num_train_timesteps)))
            if start >= steps:
                raise UserError(f"denoising_start {fraction} leaves no denoising step")
            return ImageRequest(None, None, 1.0, IMG2IMG, start, latents=latents, add_noise=False)
        strength = 0.8 if strength is None else float(strength)
        return ImageRequest(None, None, strength, IMG2IMG, _checked_start(steps, strength), latents=latents)
    if denoising_start is not None:
        raise UserError("denoising_start needs init_latents (a base pipeline's output='latents')")
    if image is None:
        if mask is not None or strength is not None:
            raise UserError("a mask or a strength needs an image")
        if inpainting_unet:
            raise UserError("this is an inpainting UNet (9 input channels): give an image and a mask")
        return None
    if unet_in_channels not in (latent_channels, 2 * latent_channels + 1):
        raise UserError(f"a UNet with {unet_in_channels} input channels cannot take {latent_channels}-channel latents")
    if mask is None and inpainting_unet:
        raise UserError("this is an inpainting UNet (9 input channels): give a mask with the image")
    image = as_image_batch(image, batch)
    mask = None if mask is None else as_mask_batch(mask, image)
    if strength is None:  # diffusers' defaults
        strength = 0.8 if mask is None else 1.0
    strength = float(strength)
    start = _checked_start(steps, strength)
    kind = IMG2IMG if mask is None else (INPAINT_CONCAT if inpainting_unet else INPAINT_BLEND)
    return ImageRequest(image=image, mask=mask, strength=strength, kind=kind, start=start)


def encode(vae, vae_params, image, key):
    """Images [B, H, W, 3] in [0, 1] -> scaled latents, sampled from the VAE posterior (diffusers'
    retrieve_latents with sample_mode="sample"), (z - shift_factor) * scaling_factor."""
    mean, logvar = vae.encode(vae_params, image * 2.0 - 1.0)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    shift = vae.config.get("shift_factor")
    if shift is not None:
        z = z - shift
    return z * vae.config.get("scaling_factor", 0.18215)


def latent_mask(mask, factor: int):
    """[B, H, W, 1] pixel mask -> [B, H/f, W/f, 1], nearest neighbour (torch's F.interpolate default)."""
    return mask[:, ::factor, ::factor]


def initial_latents(sched, plan, z0, noise, start, pure_noise):
    """The latent the loop starts from: z0 noised to plan.timesteps[start]; `pure_noise` (traced bool; inpainting
    at strength 1): noise * init_noise_sigma, as diffusers does then."""
    noised = sched.add_noise(plan, z0, noise, plan.timesteps[start])
    return jnp.where(pure_noise, noise * plan.init_noise_sigma, noised)


class WithMaskChannels:
    """An inpainting UNet's call: latents concatenated with the latent mask and the masked image's latents."""

    def __init__(self, model, extra):
        self.model, self.extra = model, extra

    def __call__(self, x, t, cond):
        extra = jnp.concatenate([self.extra] * (x.shape[0] // self.extra.shape[0])).astype(x.dtype)
        return self.model(jnp.concatenate([x, extra], axis=-1), t, cond)


def blend_known_region(sched, plan, z0, noise, mask):
    """The after-step hook of mask blending: outside the mask the latent is replaced by z0 noised to the next
    step's timestep (z0 itself after the last step); inside it the model's latent is kept."""
    last = plan.timesteps.shape[0] - 1

    def hook(i, x):
        next_t = plan.timesteps[jnp.minimum(i + 1, last)]
        known = jnp.where(i < last, sched.add_noise(plan, z0, noise, next_t), z0)
        return (1.0 - mask) * known + mask * x

    return hook
