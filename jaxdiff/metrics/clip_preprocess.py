"""CLIP image preprocessing as transformers' `CLIPImageProcessor` does it (PIL backend), in JAX, on uint8 images."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.metrics.pil_resize import FILTERS, pil_resize

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (also what the LAION OpenCLIP conversions use).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL.Image.Resampling values as stored in preprocessor_config.json ("resample": 3).
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclasses.dataclass(frozen=True)
class CLIPImageConfig:
    """size: the shortest edge after resizing; crop_size: the square center crop. `crop_first` is CMMD's order
    (google-research/cmmd io_util: center-crop the largest square, then resize it to crop_size). `pil_order`: the
    Pillow whose pass order to reproduce ("pillow13" or "pillow12", see `pil_resize.vertical_first`)."""

    size: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"
    crop_first: bool = False
    pil_order: str = "pillow13"

    @classmethod
    def for_image_size(cls, image_size: int, **kw) -> CLIPImageConfig:
        """The processor that goes with a vision tower of input `image_size` (224 or 336 for OpenAI's CLIPs)."""
        return cls(size=image_size, crop_size=image_size, **kw)

    @classmethod
    def from_preprocessor_config(cls, config: dict) -> CLIPImageConfig:
        """From a Hub `preprocessor_config.json` (only the CLIP processor's defaults are supported)."""
        size, crop = config.get("size", 224), config.get("crop_size", 224)
        size = size.get("shortest_edge") if isinstance(size, dict) else size
        crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
        resample = _PIL_RESAMPLE.get(config.get("resample", 3))
        off = [k for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize") if not config.get(k, True)]
        if not isinstance(size, int) or crop[0] != crop[1] or resample not in FILTERS or off:
            raise UserError(
                "unsupported CLIP preprocessor config: jaxdiff implements a shortest-edge resize (box, bilinear, "
                f"hamming, bicubic or lanczos), a square center crop, rescale and normalise; got size={size}, "
                f"crop_size={crop}, resample={resample}" + (f", {', '.join(off)} off" if off else "")
            )
        return cls(
            size=size,
            crop_size=crop[0],
            mean=tuple(config.get("image_mean", CLIP_MEAN)),
            std=tuple(config.get("image_std", CLIP_STD)),
            resample=resample,
        )


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(default_to_square=False)`: the short side becomes `size`, the
    long side `int(size * long / short)` (truncated)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _center_crop(x, height: int, width: int):
    # transformers' center_crop: top/left offsets (H - h) // 2.
    _, h, w, _ = x.shape
    if height > h or width > w:
        raise UserError(f"center crop {height}x{width} is larger than the resized image {h}x{w}")
    top, left = (h - height) // 2, (w - width) // 2
    return x[:, top : top + height, left : left + width]


def _normalise_table(mean, std) -> np.ndarray:
    """[3, 256] float32: every uint8 value rescaled and normalised with transformers' numpy operations (float64
    rescale by 1/255 rounded to float32, then float32 (x - mean) / std), so the lookup is bit-identical."""
    values = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((values[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)


def preprocess(images, config: CLIPImageConfig = CLIPImageConfig()):
    """uint8 images [B, H, W, 3] (one size per call) -> CLIP pixel values [B, crop, crop, 3] float32, NHWC.

    Equal to `CLIPImageProcessor(...)(images).pixel_values` (transposed to NHWC) for the processor's PIL backend:
    bit-exact PIL resampling of uint8 (see `pil_resize`), the center crop, then rescale and normalise. Jittable
    (shapes are static). Pass images as uint8, as torchmetrics' CLIPScore expects (e.g. `(x * 255).round()` of
    images in [0, 1]).
    """
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise UserError(f"images must be [B, H, W, 3], got shape {tuple(x.shape)}")
    if x.dtype != jnp.uint8:
        raise UserError(f"images must be uint8 (as CLIP's processor receives them), got {x.dtype}")
    _, h, w, _ = x.shape
    crop = config.crop_size
    if config.crop_first:
        side = min(h, w)
        x = _center_crop(x, side, side)
        if side != crop:
            x = pil_resize(x, crop, crop, config.resample, config.pil_order)
    else:
        rh, rw = resized_shape(h, w, config.size)
        if (rh, rw) != (h, w):
            x = pil_resize(x, rh, rw, config.resample, config.pil_order)
        x = _center_crop(x, crop, crop)
    table = jnp.asarray(_normalise_table(config.mean, config.std))
    channels = [jnp.take(table[c], x[..., c].astype(jnp.int32)) for c in range(3)]
    return jnp.stack(channels, axis=-1)
